"""Kill test (issue 7): `kill -9` a 2-process training run at random moments (during
start-up, between steps, inside checkpoint saves), restart it each time with
`--resume auto`, and check that it ends bit-identical to an uninterrupted run and never
loads a corrupt checkpoint.

    python bench/kill_test.py                       # 20 kills, DP=2 on gloo → bench/results/kill-test.json
    python bench/kill_test.py --kills 3 --steps 30 --out /tmp/kill-test.json
    python bench/kill_test.py --async-save          # the same with checkpoint.async_save=true

Each run is `torchrun --standalone --nproc-per-node 2 -m mamba_train.cli train` of the
tests' tiny model on a synthetic Markov corpus (tests/synthetic.py), a checkpoint every
few steps. The uninterrupted run keeps every checkpoint; the killed run keeps the last 3,
as a user would. A kill sends SIGKILL to torchrun and both workers at once. Kill moments
come from a seeded plan: a random time during start-up, a random moment after a random
step, or a random moment after the n-th save of the session has begun (its temporary
directory appeared).

Checked after every kill:
- every complete checkpoint (`step_*`) verifies against its manifest: a kill never leaves
  a corrupt checkpoint under a checkpoint's name;
- the checkpoint `--resume auto` will take equals, tensor by tensor, the uninterrupted
  run's checkpoint of that step (a check independent of the manifest), and the restarted
  run's log names it ("resumed from …"). `corrupt_loaded` counts resumes that fail this;
and at the end: the final checkpoint's tensors (weights, fp32 masters, Adam moments) and
trainer state equal the uninterrupted run's, and so does the loss of every step logged,
redone steps included. steps_lost = step reached before a kill − step resumed from.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from mamba_train.checkpoint import CheckpointError, resolve_resume, verify_checkpoint  # noqa: E402
from synthetic import tiny_overrides, write_markov_dataset  # noqa: E402

LAYOUTS = {  # the same global batch of 4 rows
    "dp2": ("train.micro_batch=2",),
    "cp2": ("parallel.cp=2",),
}
# the share of kills of each kind in the plan (the rest are "step")
PLAN = {"startup": 0.15, "save": 0.5}
RESUMED = re.compile(r"resumed from (\S+) at step (\d+)")


# ----------------------------------------------------------------------------- processes


def start(run_dir: Path, overrides: list[str], log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "mamba_train.cli", "train", "configs/tiny-cpu.yaml", *overrides, "--resume", "auto"]
    return subprocess.Popen(command, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)


def _proc_stat(pid: int) -> list[str] | None:
    try:  # fields after "(comm)": state, ppid, …
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (torchrun starts each worker in a session of its own, so
    one process group does not hold them)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) is not None:
            children.setdefault(int(stat[1]), []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    return tree


def kill_9(proc: subprocess.Popen, pids: list[int] | None = None) -> None:
    """SIGKILL to torchrun and every worker (`pids`, found beforehand so that the kill
    lands when it is meant to), within microseconds of each other; returns once none of
    them runs any more."""
    pids = process_tree(proc.pid) if pids is None else pids
    for pid in reversed(pids):  # workers first: torchrun must not see them die and react
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.monotonic() + 30
    while any((stat := _proc_stat(pid)) is not None and stat[0] != "Z" for pid in pids):
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} still run 30 s after SIGKILL")
        time.sleep(0.01)


# ----------------------------------------------------------------------------- what a run wrote


def logged_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a row cut by a kill (never seen: one small write each)
            pass
    return rows


def temporary_dirs(ckpt: Path, prefix: str = ".tmp-") -> set[tuple[str, int]]:
    """(name, inode) of the save directories in progress (or, prefix ".trash-", of those
    being deleted): a save that re-creates the directory a killed one left is a new inode."""
    try:
        return {(entry.name, entry.inode()) for entry in os.scandir(ckpt) if entry.name.startswith(prefix)}
    except FileNotFoundError:
        return set()


def save_phase(ckpt: Path, before: set) -> str | None:
    """What the kill interrupted in the checkpoint directory, if anything (`before`: the
    temporary and trash directories there when the session started, left by earlier kills)."""
    if not ckpt.is_dir():
        return None
    for name, inode in sorted(temporary_dirs(ckpt) - before):
        files = sorted(p.name for p in (ckpt / name).iterdir()) if (ckpt / name).is_dir() else []
        return f"writing {name.removeprefix('.tmp-')}: {len(files)} files" + (", manifest" if "manifest.json" in files
                                                                              else "")
    if temporary_dirs(ckpt, ".trash-") - before:
        return "deleting an old checkpoint"
    steps = sorted(p.name for p in ckpt.glob("step_*"))
    latest = (ckpt / "latest").read_text().strip() if (ckpt / "latest").is_file() else None
    if steps and latest != steps[-1]:
        return f"renamed {steps[-1]}, latest not yet updated"
    return None


def checkpoint_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update({(file.name, name): tensor for name, tensor in load_file(file).items()})
    if (path / "optimizer.pt").is_file():  # a one-process checkpoint (not what this test writes)
        import torch

        state = torch.load(path / "optimizer.pt", weights_only=True)["state"]
        tensors.update({("optimizer.pt", i, k): torch.as_tensor(v) for i, s in state.items() for k, v in s.items()})
    return tensors


def same_checkpoint(path: Path, reference: Path) -> str | None:
    """None if `path` holds exactly the reference checkpoint's tensors and trainer state
    (the config aside: its directories differ), else what differs."""
    import torch

    if not reference.is_dir():
        return f"the uninterrupted run has no {reference.name}"
    files, expected_files = (sorted(p.name for p in d.iterdir()) for d in (path, reference))
    if files != expected_files:
        return f"files {files} != {expected_files}"
    states = [json.loads((d / "trainer_state.json").read_text()) for d in (path, reference)]
    for state in states:
        state.pop("config")
    if states[0] != states[1]:
        return "trainer_state.json differs"
    tensors, expected = checkpoint_tensors(path), checkpoint_tensors(reference)
    different = [key for key in expected if key not in tensors or not torch.equal(tensors[key], expected[key])]
    return f"tensors differ: {different[:3]}" if different else None


def tensors_digest(path: Path) -> str:
    """SHA-256 of every tensor of a checkpoint (names and bytes), for the table."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for key, tensor in sorted(checkpoint_tensors(path).items(), key=lambda item: str(item[0])):
        digest.update(str(key).encode())
        digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- the test


def run_kill_test(work: Path, kills: int = 20, steps: int = 150, every: int = 3, layout: str = "dp2",
                  async_save: bool = False, seed: int = 0, plan: list[str] | None = None, log=print) -> dict:
    """Run the test in `work` and return its figures. `plan`: the kind of each kill
    ("startup", "step" or "save"); by default PLAN's shares, shuffled."""
    started = time.perf_counter()
    data = work / "data"
    if not (data / "valid.idx").exists():
        data.mkdir(parents=True, exist_ok=True)
        write_markov_dataset(data / "train", n_docs=400, seed=1)
        write_markov_dataset(data / "valid", n_docs=40, seed=2)

    def overrides(run_dir: Path, keep_last: int) -> list[str]:
        return [str(o) for o in tiny_overrides(
            data, run_dir, *LAYOUTS[layout], f"train.steps={steps}", f"checkpoint.every={every}",
            f"checkpoint.keep_last={keep_last}", f"checkpoint.async_save={str(async_save).lower()}",
            "logging.log_every=1", "train.eval_every=0", "train.torch_threads=1")]

    # --- the uninterrupted run, every checkpoint kept; its timings size the kill moments
    reference = work / "reference"
    proc = start(reference, overrides(reference, keep_last=10_000), work / "reference.log")
    launched = time.monotonic()
    while not logged_rows(reference) and proc.poll() is None:
        time.sleep(0.01)
    startup_s = time.monotonic() - launched
    if proc.wait() != 0:
        raise RuntimeError(f"the uninterrupted run failed: see {work / 'reference.log'}")
    rows = logged_rows(reference)
    reference_losses = {row["step"]: row["loss"] for row in rows}
    tokens_per_step = 4 * 64  # global batch 4 rows of data.seq_len 64 on both layouts
    step_s = statistics.median(tokens_per_step / row["tokens_per_s"] for row in rows)
    save_times = [float(s) for s in re.findall(r"(?:saved|written) in ([\d.]+) s", (work / "reference.log").read_text())]
    save_s = statistics.median(save_times)
    log(f"uninterrupted run: {steps} steps in {time.monotonic() - launched:.1f} s (start-up {startup_s:.1f} s, "
        f"step {1e3 * step_s:.0f} ms, save {1e3 * save_s:.0f} ms)")

    # --- the killed run
    rng = random.Random(seed)
    if plan is None:
        plan = ["startup"] * round(PLAN["startup"] * kills) + ["save"] * round(PLAN["save"] * kills)
        plan += ["step"] * (kills - len(plan))
        rng.shuffle(plan)
    killed = work / "killed"
    ckpt = killed / "ckpt"
    events, corrupt_complete, corrupt_loaded, fallbacks = [], [], 0, 0
    resumed_step, expected_resume = 0, None
    for session, mode in enumerate([*plan, "finish"]):
        session_log = work / f"killed-{session:02d}.log"
        rows_before, tmp_before = len(logged_rows(killed)), temporary_dirs(ckpt)
        left_before = tmp_before | temporary_dirs(ckpt, ".trash-")
        proc = start(killed, overrides(killed, keep_last=3), session_log)
        launched = time.monotonic()

        def wait_until(condition, timeout=300) -> bool:
            deadline = time.monotonic() + timeout
            while not condition():
                if proc.poll() is not None:
                    return False
                if time.monotonic() > deadline:
                    raise RuntimeError(f"session {session}: nothing happened in {timeout} s; see {session_log}")
                time.sleep(0.002)
            return True

        if mode == "finish":
            if proc.wait() != 0:
                raise RuntimeError(f"the last session failed: see {session_log}")
        else:
            pids = None  # found once the workers run, so that finding them does not delay the kill
            if mode == "startup":
                delay = rng.uniform(0.5, startup_s)
                running = wait_until(lambda: time.monotonic() - launched >= delay)
            elif mode == "step":
                target = min(steps - 1, resumed_step + rng.randint(1, 2 * every))
                running = wait_until(lambda: max([r["step"] for r in logged_rows(killed)[rows_before:]] or [0]) >= target)
                time.sleep(rng.uniform(0, step_s))
            else:  # the n-th save of this session has begun: kill somewhere inside it
                nth, seen = rng.randint(1, 2), set()

                def saves_begun() -> int:
                    seen.update(temporary_dirs(ckpt) - tmp_before)
                    return len(seen)

                running = wait_until(lambda: len(logged_rows(killed)) > rows_before)
                pids = process_tree(proc.pid)
                running = running and wait_until(lambda: saves_begun() >= nth)
                time.sleep(rng.uniform(0, save_s))
            if not running or proc.poll() is not None:
                raise RuntimeError(f"session {session} ended before its kill: raise --steps ({steps})")
            kill_9(proc, pids)
        text = session_log.read_text()
        loaded = RESUMED.search(text)
        if loaded and Path(loaded.group(1)).name != expected_resume:
            corrupt_loaded += 1  # not the checkpoint that was checked against the reference
            log(f"session {session}: loaded {loaded.group(1)}, expected {expected_resume}")
        fallbacks += text.count(": skipping step_")  # store.resolve_resume, the newest failing to verify
        if mode == "finish":
            break

        # --- after the kill: what did it hit, what is on disk, what will the next start load
        session_rows = logged_rows(killed)[rows_before:]
        reached = max([row["step"] for row in session_rows] or [resumed_step])
        phase = save_phase(ckpt, left_before)
        for path in sorted(ckpt.glob("step_*")):
            try:
                verify_checkpoint(path)
            except CheckpointError as err:
                corrupt_complete.append(f"after kill {session + 1}: {err}")
        notes = []
        try:
            chosen = resolve_resume(ckpt, "auto", log=notes.append)
        except CheckpointError as err:  # step directories, none of them whole: what a kill must never leave
            corrupt_complete.append(f"after kill {session + 1}: {err}")
            chosen = None
        if chosen is not None:
            difference = same_checkpoint(chosen, reference / "ckpt" / chosen.name)
            if difference is not None:
                corrupt_loaded += 1
                log(f"kill {session + 1}: {chosen} differs from the uninterrupted run's: {difference}")
        expected_resume = chosen.name if chosen is not None else None
        next_step = int(chosen.name.removeprefix("step_")) if chosen is not None else 0
        events.append({"kill": session + 1, "mode": mode, "seconds_after_start": round(time.monotonic() - launched, 3),
                       "resumed_from": resumed_step, "reached": reached, "during_save": phase,
                       "next_resume": next_step, "steps_lost": reached - next_step, "resume_notes": notes})
        log(f"kill {session + 1:>2} ({mode:>7}) at step {reached:>4}: {phase or 'not saving'}; "
            f"resume from {next_step}")
        resumed_step = next_step

    final = ckpt / f"step_{steps:08d}"
    difference = same_checkpoint(final, reference / "ckpt" / final.name)
    losses_identical = all(reference_losses.get(row["step"]) == row["loss"] for row in logged_rows(killed))
    return {
        "kills": len(events),
        "bit_identical": difference is None,
        "corrupt_loaded": corrupt_loaded,
        "steps_lost_max": max(event["steps_lost"] for event in events),
        "seconds": round(time.perf_counter() - started, 1),
        "layout": f"{layout}: 2 gloo processes on CPU, ZeRO-1, fp32 (torchrun)",
        "cpu": _cpu_name(),
        "async_save": async_save,
        "steps": steps,
        "checkpoint_every": every,
        "seed": seed,
        "kills_during_saves": sum(event["during_save"] is not None for event in events),
        "kills_by_mode": {mode: plan.count(mode) for mode in ("startup", "step", "save")},
        "corrupt_complete_checkpoints": corrupt_complete,
        "resume_fallbacks": fallbacks,
        "losses_identical": losses_identical,
        "final_difference": difference,
        "final_digest": {"killed": tensors_digest(final) if final.is_dir() else None,
                         "uninterrupted": tensors_digest(reference / "ckpt" / final.name)},
        "events": events,
    }


def _cpu_name() -> str:
    names = re.findall(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    return f"{names[0] if names else 'unknown'}, {os.cpu_count()} cores"


def print_table(result: dict) -> None:
    print(f"\nkill test | {result['layout']} | {result['cpu']} | {result['steps']} steps, checkpoint every "
          f"{result['checkpoint_every']}{' (async)' if result['async_save'] else ''}")
    print(f"{'kill':>4}  {'mode':>7}  {'at s':>6}  {'step':>5}  {'resume':>6}  {'lost':>4}  interrupted")
    for event in result["events"]:
        print(f"{event['kill']:>4}  {event['mode']:>7}  {event['seconds_after_start']:>6.2f}  {event['reached']:>5}  "
              f"{event['next_resume']:>6}  {event['steps_lost']:>4}  {event['during_save'] or '-'}")
    print(f"\n{'':<28}{'killed run':>18}{'uninterrupted':>18}")
    digest = result["final_digest"]
    print(f"{'final tensors sha256':<28}{digest['killed'] or '-':>18}{digest['uninterrupted']:>18}")
    for key in ("kills", "bit_identical", "corrupt_loaded", "steps_lost_max", "kills_during_saves",
                "resume_fallbacks", "losses_identical", "seconds"):
        print(f"{key:<28}{str(result[key]):>18}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])  # the first paragraph, whole
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--every", type=int, default=3, help="checkpoint.every")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="dp2")
    parser.add_argument("--async-save", action="store_true", help="checkpoint.async_save=true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, help="working directory (default: a new temporary one)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "kill-test.json")
    args = parser.parse_args()
    if args.work is None:
        import tempfile

        args.work = Path(tempfile.mkdtemp(prefix="kill-test-"))
    elif any(args.work.glob("killed*")) or (args.work / "reference").exists():
        parser.error(f"{args.work} holds an earlier kill test: give a new --work directory")
    print(f"working in {args.work}", flush=True)
    result = run_kill_test(args.work, kills=args.kills, steps=args.steps, every=args.every, layout=args.layout,
                           async_save=args.async_save, seed=args.seed, log=lambda line: print(line, flush=True))
    result["command"] = " ".join(["python", "bench/kill_test.py", *sys.argv[1:]])
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    if not result["bit_identical"] or result["corrupt_loaded"] or result["corrupt_complete_checkpoints"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
