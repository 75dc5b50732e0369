"""Prints one JSON object of parameter counts per module (trainable parameters + the 128x32 codebook,
counted in both encoder and decoder as the paper does; batch-norm statistics and EMA buffers excluded).

    python experiments/params.py --num_actions=18 --preset=paper
"""
import json

from absl import app, flags

from dlwm_jax import config as config_lib
from dlwm_jax.networks import parameter_counts

flags.DEFINE_integer("num_actions", 18, "Size of the game's action set.")
flags.DEFINE_string("preset", "paper", "Config preset.")
flags.DEFINE_integer("frame_stack", None, "Override env.frame_stack (default: the preset's, 4).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    config = config_lib.get_preset(FLAGS.preset)
    if FLAGS.frame_stack is not None:
        config = config_lib.override(config, {"env.frame_stack": FLAGS.frame_stack})
    print(json.dumps(parameter_counts(config, FLAGS.num_actions)))


if __name__ == "__main__":
    app.run(main)
