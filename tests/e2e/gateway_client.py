"""The official ``openai`` client against the gateway Service, run inside the node's network
namespace by tests/e2e/test_kubernetes.py (Service ClusterIPs exist only there).

  python gateway_client.py check BASE_URL         one JSON object: what each kind of request got
  python gateway_client.py load BASE_URL STOP OUT  requests until the file STOP exists; one JSON
                                                   line per request in OUT, flushed as it goes
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai

EASY = [{"role": "user", "content": "What is the capital of France?"}]
HARD = [
    {
        "role": "user",
        "content": "Prove step by step that every odd-degree real polynomial has a real root, "
        "then implement a root finder in python and analyze its edge cases.",
    }
]


def _client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=20)


def _chat(client: openai.OpenAI, messages: list[dict[str, str]]) -> dict[str, Any]:
    raw = client.chat.completions.with_raw_response.create(model="auto", messages=messages)  # type: ignore[arg-type]
    completion = raw.parse()
    return {
        "model": raw.headers.get("x-switchyard-model"),
        "served_by": completion.model,
        "content": completion.choices[0].message.content,
        "usage": completion.usage.total_tokens if completion.usage else None,
    }


def _stream(client: openai.OpenAI) -> dict[str, Any]:
    with client.chat.completions.with_streaming_response.create(
        model="auto",
        messages=EASY,
        stream=True,  # type: ignore[arg-type]
    ) as response:
        chunks = [c for c in response.parse() if c.choices]
        return {
            "model": response.headers.get("x-switchyard-model"),
            "chunks": len(chunks),
            "text": "".join(c.choices[0].delta.content or "" for c in chunks),
        }


def _error(call: Any) -> dict[str, Any]:
    try:
        call()
    except openai.APIStatusError as error:
        body = error.body if isinstance(error.body, dict) else {}
        return {"status": error.status_code, "class": type(error).__name__, "error": body}
    return {"status": 200}


def check(base: str) -> dict[str, Any]:
    client = _client(base)
    bad_json = httpx.post(
        f"{base}/v1/chat/completions",
        content=b'{"model": "auto", "messages": [',
        headers={"content-type": "application/json"},
        timeout=20,
    )
    return {
        "easy": _chat(client, EASY),
        "hard": _chat(client, HARD),
        "stream": _stream(client),
        "models": sorted(m.id for m in client.models.list()),
        "unknown_model": _error(
            lambda: client.chat.completions.create(model="no-such-model", messages=EASY)  # type: ignore[arg-type]
        ),
        "bad_messages": _error(
            lambda: client.chat.completions.create(model="auto", messages="hi")  # type: ignore[arg-type]
        ),
        "bad_json": {"status": bad_json.status_code, "error": bad_json.json().get("error", {})},
    }


def load(base: str, stop: Path, out: Path) -> None:
    """Light steady load: a chat request, then a streamed one, about 20 a second."""
    client = _client(base)
    with out.open("w") as sink:
        n = 0
        while not stop.exists():
            started = time.monotonic()
            record: dict[str, Any] = {"n": n, "t": time.time(), "stream": n % 2 == 1}
            try:
                result = _stream(client) if record["stream"] else _chat(client, EASY)
                record.update(status=200, model=result["model"])
            except openai.APIStatusError as error:
                record.update(status=error.status_code, error=str(error)[:300])
            except openai.APIError as error:  # connection reset, timeout: a failed request
                record.update(status=0, error=f"{type(error).__name__}: {error}"[:300])
            record["seconds"] = round(time.monotonic() - started, 4)
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            n += 1
            time.sleep(max(0.0, 0.05 - (time.monotonic() - started)))  # pacing, not sync


def main(argv: list[str]) -> int:
    command, base = argv[0], argv[1].rstrip("/")
    if command == "check":
        print(json.dumps(check(base)))
    elif command == "load":
        load(base, Path(argv[2]), Path(argv[3]))
    else:
        raise SystemExit(f"unknown command {command!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
