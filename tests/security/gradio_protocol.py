"""Speak Gradio's queue protocol directly, as a hostile client would: any session hash, any event."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass(frozen=True)
class Dependency:
    """One event of the page: its index, the component that triggers it, its inputs and outputs."""

    fn_index: int
    trigger_id: int
    inputs: list[int]
    outputs: list[int]


def login(client: httpx.Client, username: str, password: str) -> None:
    """Sign in through Gradio's login form; the client keeps the cookie."""
    response = client.post("login", data={"username": username, "password": password})
    assert response.status_code in (200, 302, 303), response.text


def dependency(config: dict[str, Any], *, elem_id: str, event: str) -> Dependency:
    """The event `event` of the component with `elem_id` in the page's /config."""
    ids = {c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == elem_id}
    for index, dep in enumerate(config["dependencies"]):
        for target_id, target_event in dep["targets"]:
            if target_id in ids and target_event == event:
                return Dependency(fn_index=dep.get("id", index), trigger_id=target_id, inputs=dep["inputs"],
                                  outputs=dep["outputs"])
    raise LookupError(f"no {event} event on #{elem_id}")


def component_id(config: dict[str, Any], name: str) -> int:
    """The id of the component whose elem_id, or else label, is `name`."""
    for key in ("elem_id", "label"):
        ids = [c["id"] for c in config["components"] if c.get("props", {}).get(key) == name]
        if ids:
            return ids[0]
    raise LookupError(f"no component #{name}")


def data_for(config: dict[str, Any], dep: Dependency, values: dict[str, Any]) -> list[Any]:
    """The event's input data: `values` by elem_id or label; None for the others (e.g. gr.State,
    whose value the server takes from the session anyway)."""
    data: list[Any] = [None] * len(dep.inputs)
    for name, value in values.items():
        data[dep.inputs.index(component_id(config, name))] = value
    return data


def output_of(config: dict[str, Any], dep: Dependency, completed: dict[str, Any], name: str) -> Any:
    """What the completed event sent to the component `name` (an update dict, a value, or None)."""
    return completed["output"]["data"][dep.outputs.index(component_id(config, name))]


def run_event(client: httpx.Client, dep: Dependency, data: list[Any], *, session_hash: str,
              timeout: float = 60) -> dict[str, Any]:
    """Join the queue with `data` under `session_hash` and return the completion message."""
    joined = client.post("gradio_api/queue/join", json={
        "data": data, "fn_index": dep.fn_index, "trigger_id": dep.trigger_id, "session_hash": session_hash,
        "event_data": None})
    if joined.status_code != 200:
        return {"msg": "refused", "status_code": joined.status_code, "body": joined.text}
    event_id = joined.json()["event_id"]
    for message in queue_messages(client, session_hash=session_hash, timeout=timeout):
        if message.get("event_id") == event_id and message.get("msg") == "process_completed":
            return message
    raise AssertionError(f"event {event_id} never completed")


def queue_messages(client: httpx.Client, *, session_hash: str, timeout: float) -> Iterator[dict[str, Any]]:
    """The server-sent events of `session_hash` until the stream closes."""
    with client.stream("GET", "gradio_api/queue/data", params={"session_hash": session_hash},
                       timeout=timeout) as response:
        if response.status_code != 200:
            yield {"msg": "refused", "status_code": response.status_code}
            return
        for line in response.iter_lines():
            if line.startswith("data:"):
                message = json.loads(line[5:])
                yield message
                if message.get("msg") == "close_stream":
                    return


def chained(config: dict[str, Any], *, after: Dependency) -> Dependency:
    """The event the page runs once `after` has succeeded (`.success(...)` / `.then(...)`)."""
    for index, dep in enumerate(config["dependencies"]):
        if dep.get("trigger_after") == after.fn_index:
            return Dependency(fn_index=dep.get("id", index), trigger_id=after.trigger_id, inputs=dep["inputs"],
                              outputs=dep["outputs"])
    raise LookupError(f"nothing runs after event {after.fn_index}")
