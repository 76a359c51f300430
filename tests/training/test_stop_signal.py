"""Stop signals: SIGTERM, SIGINT, SIGHUP and SIGUSR1 are caught, and the save after one is time-bounded."""

import os
import signal

import pytest

from vla_train.training.trainer import STOP_SIGNALS, StopSignal


def test_no_signal_means_no_stop(process_group):
    stop = StopSignal(save_budget_s=25.0)
    try:
        decision = stop.decide()
    finally:
        stop.restore()
    assert not decision.stop and not decision.save


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1])
def test_each_stop_signal_stops_and_saves_when_the_save_fits(process_group, signum):
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    stop = StopSignal(save_budget_s=25.0)
    try:
        stop.last_save_s = 1.0
        os.kill(os.getpid(), signum)  # the process survives: the handler records it
        decision = stop.decide()
    finally:
        stop.restore()
    assert decision.stop and decision.save
    assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} == before


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1])
def test_a_save_that_cannot_fit_the_budget_is_skipped(process_group, signum):
    stop = StopSignal(save_budget_s=25.0)
    try:
        stop.last_save_s = 40.0  # the launcher's SIGKILL would cut it off
        os.kill(os.getpid(), signum)
        decision = stop.decide()
    finally:
        stop.restore()
    assert decision.stop and not decision.save
    assert "the last save took 40.0 s" in decision.reason and "25 s budget (--signal_save_budget_s)" in decision.reason


def test_without_a_budget_or_a_measured_save_it_always_saves(process_group):
    for budget, last_save in ((None, 40.0), (25.0, None)):
        stop = StopSignal(save_budget_s=budget)
        try:
            stop.last_save_s = last_save
            os.kill(os.getpid(), signal.SIGTERM)
            decision = stop.decide()
        finally:
            stop.restore()
        assert decision.stop and decision.save
