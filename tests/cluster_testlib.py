"""A Ray cluster of one or two nodes on this machine for the cluster tests, held by a helper process.

The test process itself never joins it (the test session has its own in-process Ray): `python
cluster_testlib.py DIR NODES` starts the cluster with `ray.cluster_utils.Cluster`, as Ray's own tests
do, and answers one-line commands on stdin; `LocalCluster` runs that helper and always takes the
cluster down.

Two nodes: head "node_a" (3 logical CPUs) and "node_b" (2), each with a small object store. Each runs in
a working directory of its own, node_b with its own HOME too, so a worker that resolves a relative path,
or reads something from HOME, does not find the driver's. One node: the head alone, with the CPUs of both.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Logical CPUs. The head (where drivers on this machine attach) has room for two 1-CPU actors, so Ray's
# default placement, which fills the driver's node up to half its CPUs first, would put both there:
# actors found on both nodes were spread on purpose.
HEAD_CPUS, NODE_B_CPUS = 3, 2
OBJECT_STORE_BYTES = 250_000_000
START_TIMEOUT_S = 180
START_ATTEMPTS = 2
REPLY_TIMEOUT_S = 60


def _serve(state_dir: Path, n_nodes: int) -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray.cluster_utils import Cluster

    common = {"object_store_memory": OBJECT_STORE_BYTES, "include_dashboard": False}
    head_cpus = HEAD_CPUS if n_nodes == 2 else HEAD_CPUS + NODE_B_CPUS
    cluster = Cluster(initialize_head=True, head_node_args={**common, "num_cpus": head_cpus})
    try:
        nodes = {"node_a": cluster.head_node.node_id}
        node_b = _add_node_b(cluster, state_dir / "node_b", {**common, "num_cpus": NODE_B_CPUS}) if n_nodes == 2 else None
        if node_b is not None:
            nodes["node_b"] = node_b.node_id
        cluster.wait_for_nodes()
        # This helper is a driver too, only to read the GCS tables (which node ran which actor).
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        _reply({"address": cluster.address, "nodes": nodes})
        for line in sys.stdin:
            command = line.strip()
            if command == "actors":
                _reply({"actors": _actors(nodes)})
            elif command == "kill node_b" and node_b is not None:
                cluster.remove_node(node_b, allow_graceful=False)
                _reply({"killed": nodes["node_b"]})
            else:
                _reply({"error": f"unknown command {command!r}"})
    finally:
        ray.shutdown()
        cluster.shutdown()


def _add_node_b(cluster, folder: Path, args: dict):
    """A node takes its working directory and environment from the process that starts it."""
    (folder / "home").mkdir(parents=True, exist_ok=True)
    here, home = os.getcwd(), os.environ.get("HOME")
    os.chdir(folder)
    os.environ["HOME"] = str(folder / "home")
    try:
        return cluster.add_node(**args)
    finally:
        os.chdir(here)
        if home is not None:
            os.environ["HOME"] = home


def _actors(nodes: dict[str, str]) -> list[dict]:
    """Every actor the cluster has run, alive or dead: id, class, state and node ("node_a"/"node_b")."""
    from ray._private.state import actors

    names = {node_id: name for name, node_id in nodes.items()}
    return [{"id": actor_id, "class": a.get("ActorClassName", ""), "state": a.get("State"),
             "node_name": names.get((a.get("Address") or {}).get("NodeID"), "unknown")}
            for actor_id, a in actors().items()]


def _reply(message: dict) -> None:
    print(json.dumps(message), file=_REPLIES, flush=True)


class LocalCluster:
    """`with LocalCluster(nodes=2) as c:` c.address (for --ray-address), c.nodes {"node_a": id, ...},
    c.actors(), c.kill_node_b(). Leaving the block shuts the cluster down; the helper runs in its own
    session so whatever is left of it can be killed by session, never by name."""

    def __init__(self, nodes: int = 2) -> None:
        # Ray gives a starting node 30 s to register, which a machine busy with other tests can exceed:
        # a second try, after the first one's processes are gone.
        for attempt in range(START_ATTEMPTS):
            self._start(nodes)
            try:
                ready = self._read(START_TIMEOUT_S)
                break
            except (RuntimeError, TimeoutError):
                self.close()
                if attempt == START_ATTEMPTS - 1:
                    raise
            except BaseException:
                self.close()
                raise
        self.address: str = ready["address"]
        self.nodes: dict[str, str] = ready["nodes"]

    def _start(self, nodes: int) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="vxc-"))  # short: Ray's socket paths must stay < 108 chars
        self._log = open(self.dir / "helper.log", "wb")
        # Its own Ray temp dir: session files and the "current cluster" address file of other Rays on this
        # machine stay untouched.
        env = {**os.environ, "RAY_TMPDIR": str(self.dir)}
        env.pop("RAY_ADDRESS", None)
        # The head node (and its workers) work in a folder of their own too, not in the tests' folder.
        (self.dir / "node_a").mkdir()
        self._proc = subprocess.Popen([sys.executable, __file__, str(self.dir), str(nodes)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._log, env=env, cwd=self.dir / "node_a",
                                      text=True, start_new_session=True)

    def _read(self, timeout: float) -> dict:
        with selectors.DefaultSelector() as sel:
            sel.register(self._proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise TimeoutError(f"cluster helper gave no answer in {timeout:.0f} s; log: {self.log_tail()}")
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"cluster helper exited ({self._proc.poll()}); log: {self.log_tail()}")
        return json.loads(line)

    def _ask(self, command: str) -> dict:
        self._proc.stdin.write(command + "\n")
        self._proc.stdin.flush()
        answer = self._read(REPLY_TIMEOUT_S)
        if "error" in answer:
            raise RuntimeError(f"cluster helper: {answer['error']}")
        return answer

    def actors(self) -> list[dict]:
        return self._ask("actors")["actors"]

    def kill_node_b(self) -> None:
        self._ask("kill node_b")

    def log_tail(self) -> str:
        self._log.flush()
        return (self.dir / "helper.log").read_text(errors="replace")[-3000:]

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.stdin.close()  # EOF: the helper shuts the cluster down
                self._proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait(timeout=30)
        self._kill_leftovers()
        self._proc.stdout.close()
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _kill_leftovers(self) -> None:
        """Processes of this cluster that outlived the helper: they share its session id."""
        deadline = time.monotonic() + 10
        while (left := _session_members(self._proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _session_members(sid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # the 6th field of stat: session id
            found.append(int(entry))
    return found


if __name__ == "__main__":
    # Replies get stdout to themselves: whatever Ray prints goes to stderr (the helper's log) instead.
    _REPLIES = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    _serve(Path(sys.argv[1]), int(sys.argv[2]))
