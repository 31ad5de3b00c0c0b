"""Run the published FlexGen package (PyPI `flexgen` 0.1.8) offline, as the peer baseline.

FlexGen asks the model hub for a tokenizer only; a stand-in tokenizer that left-pads a fixed
prompt to the requested length replaces it. Its weights are its own `--path _DUMMY_` mode.
`--gpu-cap-gib` limits what PyTorch may allocate on each GPU, to emulate a smaller card.
`--pipeline N` runs FlexGen's own pipeline-parallel version (`flexgen.dist_flex_opt`): N processes
on this host, one per GPU, NCCL between them; the last stage prints the report.
All other arguments go to `flexgen.flex_opt` (or `flexgen.dist_flex_opt`) unchanged.
"""
import argparse
import signal
import socket
import subprocess
import sys
import time

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_stages(stages: int, rest: list[str], cap: float | None) -> int:
    """FlexGen's pipeline: one process per stage; the first to fail ends the others."""
    port = free_port()
    procs = []
    for rank in range(stages):
        cmd = [sys.executable, __file__, *rest, "--head-ip", "127.0.0.1", "--port", str(port),
               "--world-size", str(stages), "--rank", str(rank), "--local-rank", str(rank)]
        procs.append(subprocess.Popen(cmd + (["--gpu-cap-gib", f"{cap:g}"] if cap else [])))
    try:
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs):
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait()
    return max((p.returncode for p in procs), key=abs)


def main() -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--gpu-cap-gib", type=float, default=None)
    pre.add_argument("--pipeline", type=int, default=1)
    known, rest = pre.parse_known_args()
    if known.pipeline > 1:
        return launch_stages(known.pipeline, rest, known.gpu_cap_gib)
    transformers.AutoTokenizer.from_pretrained = staticmethod(lambda *a, **k: PaddingTokenizer())
    distributed = "--world-size" in rest
    if distributed:
        from flexgen import dist_flex_opt as flexgen
    else:
        from flexgen import flex_opt as flexgen
    parser = argparse.ArgumentParser()
    flexgen.add_parser_arguments(parser)
    if distributed:
        flexgen.add_distributed_parser_arguments(parser)
    args = parser.parse_args(rest)
    device = args.local_rank if distributed else 0
    if known.gpu_cap_gib:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(known.gpu_cap_gib * (1 << 30) / total, device)
    if not distributed:
        flexgen.run_flexgen(args)
        return 0
    flexgen.args = args  # its comm_test reads the module's global `args`
    flexgen.initialize_distributed(args.head_ip, args.port, args.world_size, args.rank, args.local_rank,
                                   args.comm_device)
    flexgen.run_flexgen_dist(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
