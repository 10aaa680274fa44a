"""lm-eval's own command line with the model `hf-kvq` registered (lm-eval finds no models by entry point):

    python -m mixkvq.lmeval.cli run --model hf-kvq --model_args pretrained=<hub id>,kv_method=kivi --tasks gsm8k
"""

from lm_eval.__main__ import cli_evaluate

import mixkvq.lmeval.model  # noqa: F401  (registers hf-kvq)

if __name__ == "__main__":
    cli_evaluate()
