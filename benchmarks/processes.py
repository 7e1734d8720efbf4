"""A benchmark's variants, run by run_variants and driven step by step (Child), so that several take turns.

Every variant runs in its own fresh process, so peaks never mix. The processes are forked from a server
(multiprocessing's forkserver) that imported the benchmark and the modules named by `preload` once, before
computing anything: a variant then starts in milliseconds instead of the seconds an import of torch and
transformers takes, and, like a new interpreter, it has run no kernel and touched no GPU.
"""
from __future__ import annotations

import multiprocessing
import os
import statistics

import torch


def _serve(connection, prepare, variant: str, args) -> None:
    """Child side: `prepare(variant, args)` builds everything and returns (step, finish); then one `step()` per
    "step" the parent sends, and `finish()` when it sends anything else. Each answer is a small dict."""
    try:
        torch.set_num_threads(args.threads)
        step, finish = prepare(variant, args)
        connection.send(("ready", None))
        while connection.recv() == "step":
            connection.send(("step", step()))
        connection.send(("done", finish()))
    except BaseException as error:  # the parent prints why; the traceback goes to stderr as usual
        connection.send(("error", f"{type(error).__name__}: {error}"))
        raise


class Child:
    """One variant in a fresh process, driven step by step, so that several variants can take turns."""

    def __init__(self, prepare, variant: str, args, preload: tuple[str, ...]):
        # An OpenMP thread spins while it waits for work; on a shared CPU that burns the cores other processes
        # wait for (at load 15 on 2 cores a 2-thread step here used 17–20 s of CPU instead of 7). The children
        # (forked from a server that inherits this environment) sleep instead, unless the caller chose otherwise.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["__main__", *preload])
        self.variant, self.error, self.steps = variant, None, []
        self.connection, child_end = context.Pipe()
        self.process = context.Process(target=_serve, args=(child_end, prepare, variant, args), daemon=True)
        self.process.start()
        child_end.close()  # the child holds its end: a child that dies then reads as end of file here
        self.receive("ready")

    def ask(self, command: str, word: str):
        """Send `command`; the child's answer, or None once it has failed (`error` says why)."""
        if self.error:
            return None
        try:
            self.connection.send(command)
        except OSError:  # the child is gone; receive() says why
            pass
        return self.receive(word)

    def receive(self, word: str):
        try:
            kind, value = self.connection.recv()
        except (EOFError, OSError):
            self.process.join()
            code = self.process.exitcode
            kind, value = "error", (f"killed by signal {-code} (out of memory?)" if code and code < 0
                                    else f"exited with code {code}")
        if kind == word:
            return value
        self.error = str(value)[-160:]
        self.process.join()
        return None

    def step(self) -> None:
        answer = self.ask("step", "step")
        if answer is not None:
            self.steps.append(answer)

    def finish(self) -> dict:
        """{"steps": the step dicts, "seconds", "cpu_seconds": their median times, "peak_bytes": their largest peak,
        "before_bytes", "exact", "first": the first step's dict, and the finish dict}, or {"error": why}."""
        final = self.ask("finish", "done")
        self.process.join()
        if self.error:
            return {"error": self.error}
        steps = self.steps
        return dict(final, steps=steps, first=steps[0], seconds=statistics.median(s["seconds"] for s in steps),
                    cpu_seconds=statistics.median(s["cpu_seconds"] for s in steps),
                    peak_bytes=max(s["peak_bytes"] for s in steps), before_bytes=steps[0]["before_bytes"],
                    exact=all(s["exact"] for s in steps))


def run_variants(prepare, variants, args, repeats: int, together: bool, preload: tuple[str, ...] = ()) -> dict:
    """Each variant in its own fresh process, `repeats` steps each; {variant: Child.finish()}.

    `together`: every variant's process is built first, then they take their steps in turn, the order
    reversed every round, so a shared machine's changing load slows them alike (the memory of every variant
    is held at once). Otherwise one process at a time (one variant's memory at a time, e.g. a GPU)."""
    if not together:
        return {v: run_variants(prepare, [v], args, repeats, True, preload)[v] for v in variants}
    children = [Child(prepare, v, args, preload) for v in variants]
    for repeat in range(repeats):
        for child in children[::1 if repeat % 2 == 0 else -1]:
            child.step()
    return {child.variant: child.finish() for child in children}
