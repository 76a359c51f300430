"""`passthrough`: datasets already in the common format, as `vla_train.data.convert` writes them.

Observation keys stay as written (the YAML entry names the image and state keys), the action `[T, A]` is cast to
float32 and must already follow the gripper convention (1 = open, 0 = closed), and the language instruction is the
step-level `language_instruction` `[T]`.
"""

from vla_train.data.standardize import Trajectory, register
from vla_train.data.tf_setup import tf


@register("passthrough")
def passthrough_transform(traj: Trajectory) -> Trajectory:
    """The trajectory unchanged except `action`, cast to float32."""
    return {**traj, "action": tf.cast(traj["action"], tf.float32)}
