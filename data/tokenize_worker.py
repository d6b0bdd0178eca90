"""The tokenizer processes of ``alcot data prepare`` (numpy and ``tokenizers`` only: a worker
starts in a fraction of a second and holds little memory)."""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import subprocess
import sys
import threading

import numpy as np

_TOKENIZER = None
_EOS = 0
_DTYPE = np.uint16


def init(tokenizer_path: str, eos: int, dtype: str) -> None:
    """Load the tokenizer once per process; one thread each (the processes are the
    parallelism)."""
    global _TOKENIZER, _EOS, _DTYPE
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _TOKENIZER = Tokenizer.from_file(tokenizer_path)
    _EOS, _DTYPE = eos, np.dtype(dtype)


def encode(docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The documents' token ids, each followed by the end-of-text token, back to back, and
    each document's length (end-of-text included)."""
    encs = _TOKENIZER.encode_batch(docs)
    lengths = np.fromiter((len(e.ids) + 1 for e in encs), dtype=np.int64, count=len(encs))
    out = np.empty(int(lengths.sum()), dtype=_DTYPE)
    pos = 0
    for e, n in zip(encs, lengths.tolist(), strict=True):
        out[pos : pos + n - 1] = e.ids
        out[pos + n - 1] = _EOS
        pos += n
    return out, lengths


# ------------------------------------------------------------------------------ as a process
def _read_frame(stream):
    head = stream.read(8)
    if len(head) < 8:
        return None
    return pickle.loads(stream.read(int.from_bytes(head, "little")))


def _write_frame(stream, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(len(data).to_bytes(8, "little"))
    stream.write(data)
    stream.flush()


def serve() -> None:
    """``python -m alcot.data.tokenize_worker TOKENIZER EOS DTYPE``: read pickled lists of
    documents on stdin, write their ``encode`` results on stdout, until stdin closes."""
    init(sys.argv[1], int(sys.argv[2]), sys.argv[3])
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while (docs := _read_frame(stdin)) is not None:
        _write_frame(stdout, encode(docs))


class Pool:
    """``workers`` tokenizer processes (plain subprocesses: nothing of the caller's main
    module is imported, so a script without a ``__main__`` guard works too). Chunks go to the
    processes in turn and come back in the order they were sent."""

    def __init__(self, workers: int, tokenizer_path: str, eos: int, dtype: str):
        cmd = [sys.executable, "-m", "alcot.data.tokenize_worker", tokenizer_path, str(eos), dtype]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        self.procs = [
            subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
            for _ in range(workers)
        ]
        self.results = [queue.Queue() for _ in self.procs]
        self.readers = [
            threading.Thread(target=self._read, args=(p, q), daemon=True)
            for p, q in zip(self.procs, self.results, strict=True)
        ]
        for t in self.readers:
            t.start()
        self.sent = 0

    @staticmethod
    def _read(proc, results) -> None:
        while True:
            try:
                out = _read_frame(proc.stdout)
            except Exception as err:  # a torn frame: the process died
                out = err
            results.put(out)
            if out is None or isinstance(out, Exception):
                return

    def submit(self, docs: list[str]) -> int:
        """Send a chunk; returns its worker's index (``result`` takes it back)."""
        w = self.sent % len(self.procs)
        _write_frame(self.procs[w].stdin, docs)
        self.sent += 1
        return w

    def result(self, w: int):
        out = self.results[w].get()
        if out is None or isinstance(out, Exception):
            code = self.procs[w].wait()
            raise RuntimeError(f"tokenizer process {w} stopped (exit code {code})")
        return out

    def close(self) -> None:
        for p in self.procs:
            with contextlib.suppress(OSError):
                p.stdin.close()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


if __name__ == "__main__":
    serve()
