"""Run the published FlexGen package (PyPI `flexgen` 0.1.8) offline, as the peer baseline.

FlexGen asks the model hub for a tokenizer only; a stand-in tokenizer that left-pads a fixed
prompt to the requested length replaces it. Its weights are its own `--path _DUMMY_` mode.
`--gpu-cap-gib` limits what PyTorch may allocate on the GPU, to emulate a smaller card.
All other arguments go to `flexgen.flex_opt` unchanged.
"""
import argparse

import torch
import transformers


class _Encoded:
    def __init__(self, input_ids):
        self.input_ids = input_ids


class PaddingTokenizer:
    """Enough of a tokenizer for FlexGen's benchmark: fixed token ids, left padding."""

    pad_token_id = 1
    eos_token_id = 2

    def __call__(self, prompts, padding=None, max_length=None, **_):
        body = [2, 1721, 16, 5, 812, 343, 9]  # "</s>Paris is the capital city of" in OPT's vocabulary
        return _Encoded([[self.pad_token_id] * (max_length - len(body)) + body for _ in prompts])

    def batch_decode(self, ids, **_):
        return ["" for _ in ids]


def main() -> None:
    transformers.AutoTokenizer.from_pretrained = staticmethod(lambda *a, **k: PaddingTokenizer())
    from flexgen import flex_opt

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--gpu-cap-gib", type=float, default=None)
    known, rest = pre.parse_known_args()
    if known.gpu_cap_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(known.gpu_cap_gib * (1 << 30) / total)
    parser = argparse.ArgumentParser()
    flex_opt.add_parser_arguments(parser)
    flex_opt.run_flexgen(parser.parse_args(rest))


if __name__ == "__main__":
    main()
