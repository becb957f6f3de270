"""The recorder process (issue 26): records live outside the scheduler and outside the trainer, so stopping the
server the usual ways, killing the trainer, or killing the recorder itself loses no finished request. Real SGLang
on the CPU platform, --online-train with a persist directory and the DEFAULT shard timing (a shard every 300 s or
65536 tokens: every record of these tests is still waiting in the recorder's memory when the server is stopped).

Stops: SIGTERM to every process of the server at once (`kill -- -PGID`, systemd's control-group stop), SIGTERM to
`launch_server` alone, and Ctrl-C (SIGINT to the terminal's process group). Kills (a server with the trainer on):
the trainer SIGKILLed mid-traffic, then the recorder SIGKILLed (restarted and counted; serving goes on)."""
import os
import signal
import time

import psutil
import pytest

from sglang_ext.demo.prompts import TEXT_PROMPTS, chat_prompt
from sglang_ext.demo.traffic import processes_running, server_processes, trainer_pids
from sglang_ext.launcher import draft_args, launch_server, metric_value
from support.servers import launch_servers, run_concurrently
from trainer.replay import ReplayReader

pytestmark = pytest.mark.server
N_REQUESTS = 12
MAX_NEW = 16
RECORDER = "sglang_ext.online.recorder.process"
STOPS = ("sigterm_group", "sigterm_launcher", "ctrl_c")


def prompts(tag: str, n: int) -> list[str]:
    return [chat_prompt(f"[{tag} {i}] {TEXT_PROMPTS[i % len(TEXT_PROMPTS)]}") for i in range(n)]


def send(server, texts: list[str]) -> list[str]:
    """One request at a time; the request ids of the finished ones."""
    return [server.generate(text, max_new_tokens=MAX_NEW)["meta_info"]["id"] for text in texts]


def recorder_pids(server) -> list[int]:
    return processes_running(server, RECORDER)


def persisted_rids(replay_dir) -> set[str]:
    reader = ReplayReader(replay_dir)
    return {reader.read(i).meta["rid"] for i in range(len(reader))}


def persisted_so_far(replay_dir) -> set[str]:
    """persisted_rids while the server writes: nothing before its first shard."""
    return persisted_rids(replay_dir) if (replay_dir / "manifest.json").exists() else set()


def stop(server, how: str) -> float:
    """Stop the server `how`; wait until every one of its processes (the recorder included, which is not a
    descendant of the launcher) is gone. Returns the seconds that took."""
    everyone = server_processes(server)
    t0 = time.monotonic()
    if how == "sigterm_group":
        os.killpg(server.process.pid, signal.SIGTERM)          # launch_server starts a new session: pgid == pid
    elif how == "sigterm_launcher":
        os.kill(server.process.pid, signal.SIGTERM)
    else:                                                    # a terminal's Ctrl-C: SIGINT to the foreground group
        os.killpg(server.process.pid, signal.SIGINT)
    _, alive = psutil.wait_procs(everyone, timeout=90)
    assert not alive, f"{how}: still running after 90 s: {[(p.pid, p.name()) for p in alive]}"
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def stop_servers(tiny, server_log_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("stops")
    launchers = [launch_server(tiny.dense, draft_args(tiny.draft_dense) + [
        "--online-train", "--online-train-capture-only", "--online-train-persist-dir", str(root / how)],
        log_dir=server_log_dir, name=f"stop-{how}") for how in STOPS]
    with launch_servers(*launchers) as servers:
        yield dict(zip(STOPS, servers)), root


def test_every_way_of_stopping_keeps_every_finished_record(stop_servers):
    servers, root = stop_servers
    finished = dict(zip(STOPS, run_concurrently(*(lambda s=s, how=how: send(s, prompts(how, N_REQUESTS))
                                                   for how, s in servers.items()))))
    for how, server in servers.items():
        assert len(recorder_pids(server)) == 1
        assert not (root / how / "manifest.json").exists() or not persisted_rids(root / how) & set(finished[how]), \
            "the default shard timing should keep these records in memory until the stop"
        took = stop(server, how)
        kept = persisted_rids(root / how)
        assert set(finished[how]) <= kept, (how, sorted(set(finished[how]) - kept))
        assert took < 60, (how, took)


def test_trainer_and_recorder_killed_lose_no_record(tiny, server_log_dir, tmp_path):
    persist = tmp_path / "replay"
    args = draft_args(tiny.draft_dense) + ["--online-train", "--online-train-persist-dir", str(persist),
                                           "--online-train-shard-seconds", "1", "--online-train-min-records", "4"]
    with launch_server(tiny.dense, args, log_dir=server_log_dir, name="recorder-kills") as server:
        finished = send(server, prompts("before", 6))
        deadline = time.monotonic() + 120
        while not trainer_pids(server) and time.monotonic() < deadline:
            time.sleep(0.5)
        (trainer,) = trainer_pids(server)
        os.kill(trainer, signal.SIGKILL)                     # the records are the recorder's, not the trainer's
        finished += send(server, prompts("trainer-killed", 4))
        # What the recorder holds in memory dies with it: wait until it has written these (a shard a second), and
        # until it has restarted the trainer (counted; a recorder killed before that would start a first trainer)
        # (by request id: the persisted count also holds SGLang's warm-up request)
        deadline = time.monotonic() + 120
        while (not set(finished) <= persisted_so_far(persist)
               or metric_value(server.metrics(), "sglang:online_train_trainer_restarts_total") < 1) and \
                time.monotonic() < deadline:
            time.sleep(0.5)
        text = server.metrics()
        assert metric_value(text, "sglang:online_train_trainer_restarts_total") >= 1, "the trainer was not restarted"
        (recorder,) = recorder_pids(server)
        os.kill(recorder, signal.SIGKILL)
        finished_while_down = send(server, prompts("recorder-killed", 4))   # serving goes on meanwhile
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            text = server.metrics()
            if metric_value(text, "sglang:online_train_recorder_restarts_total") >= 1 and recorder_pids(server) and \
                    metric_value(text, "sglang:online_train_trainer_restarts_total") >= 1:
                break
            time.sleep(0.5)
        assert recorder_pids(server) and recorder_pids(server) != [recorder]
        # What the scheduler wrote into the ring while no recorder ran waited there for the new one
        deadline = time.monotonic() + 120
        while not set(finished + finished_while_down) <= persisted_so_far(persist) and time.monotonic() < deadline:
            time.sleep(0.5)
        text = server.metrics()
        assert metric_value(text, "sglang:online_train_recorder_restarts_total") == 1
        assert metric_value(text, "sglang:online_train_trainer_restarts_total") >= 1
        finished_after = send(server, prompts("after", 4))
        stop(server, "sigterm_group")
    kept = persisted_rids(persist)
    assert set(finished + finished_while_down + finished_after) <= kept, \
        sorted(set(finished + finished_while_down + finished_after) - kept)
