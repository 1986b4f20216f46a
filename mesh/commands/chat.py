"""`shoal chat "PROMPT"`: stream an answer to the terminal.

Talks to a running node when one answers on the configured address (HTTP + SSE, like any OpenAI client);
otherwise loads the model in this process (compiling it on first use, with a progress line on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
from shoal.mesh.commands.cli import CommandError
from shoal.mesh.commands.node import add_config_arguments, config_overrides
from shoal.mesh.node.config import ConfigError, NodeConfig, load_config, parse_host_port

PROBE_TIMEOUT_S = 1.0
STREAM_IDLE_TIMEOUT_S = 600.0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="ask the model something and stream the answer",
        description="Stream a chat answer to the terminal. Uses the node running on the configured address "
        "when one answers; otherwise runs the model in this process (compiling it on first use).",
    )
    parser.add_argument("prompt", help="what to ask")
    parser.add_argument("--model", help="model name (default: the node's default model)")
    parser.add_argument(
        "--max-tokens", type=int, default=256, metavar="N", help="longest answer (default 256)"
    )
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    parser.add_argument("--system", metavar="S", help="system prompt")
    parser.add_argument("--api", metavar="URL", help="node to ask (default: the configured address)")
    parser.add_argument("--local", action="store_true", help="never use a running node; run in-process")
    add_config_arguments(parser)
    parser.set_defaults(handler=run)


def _messages(args: argparse.Namespace) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": args.system}] if args.system else []
    return [*messages, {"role": "user", "content": args.prompt}]


def _base_url(args: argparse.Namespace, config: NodeConfig) -> str:
    if args.api:
        if args.api.startswith(("http://", "https://")):
            return args.api.rstrip("/")
        host, port = parse_host_port(args.api)
    else:
        host, port = config.api.host, config.api.port
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run(args: argparse.Namespace) -> int:
    if args.max_tokens < 1:
        raise CommandError("--max-tokens must be at least 1")
    if not 0.0 <= args.temperature <= 2.0:
        raise CommandError("--temperature must be between 0 and 2")
    try:
        config = load_config(args.config, overrides=config_overrides(args))
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    return asyncio.run(_chat(args, config))


async def _chat(args: argparse.Namespace, config: NodeConfig) -> int:
    url = _base_url(args, config)
    headers = {"Authorization": f"Bearer {config.api.key}"} if config.api.key else {}
    if not args.local and await _node_answers(url, headers):
        pieces = _remote(url, headers, args)
    else:
        if args.api:
            raise CommandError(f"no shoal node answers at {url}")
        pieces = _in_process(args, config)
    ended_with_newline = True
    async for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
        ended_with_newline = piece.endswith("\n")
    if not ended_with_newline:
        sys.stdout.write("\n")
    return 0


async def _node_answers(url: str, headers: dict[str, str]) -> bool:
    timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout, headers=headers) as session,
            session.get(f"{url}/health") as response,
        ):
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


async def _remote(url: str, headers: dict[str, str], args: argparse.Namespace) -> AsyncIterator[str]:
    body: dict[str, Any] = {
        "messages": _messages(args),
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "stream": True,
    }
    if args.model:
        body["model"] = args.model
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=STREAM_IDLE_TIMEOUT_S)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout, headers=headers) as session,
            session.post(
                f"{url}/v1/chat/completions",
                data=orjson.dumps(body),
                headers={"Content-Type": "application/json"},
            ) as response,
        ):
            if response.status != 200:
                raise CommandError(_error_message(response.status, await response.read()))
            status = _StatusLine()
            async for line in response.content:
                if line.startswith(PROGRESS_COMMENT):  # why the node makes us wait: on stderr, in place
                    status.show(line[len(PROGRESS_COMMENT):])
                    continue
                if not line.startswith(b"data: "):
                    continue
                payload = line[6:].strip()
                if payload == b"[DONE]":
                    return
                chunk = orjson.loads(payload)
                if "error" in chunk:
                    raise CommandError(f"the node stopped the answer: {chunk['error'].get('message')}")
                for choice in chunk.get("choices", []):
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        status.clear()
                        yield text
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise CommandError(f"lost the connection to the node at {url}: {exc}") from None


def _error_message(status: int, raw: bytes) -> str:
    try:
        error = orjson.loads(raw)["error"]
        return f"the node refused ({status}): {error['message']}"
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return f"the node answered HTTP {status}"


PROGRESS_COMMENT = b": shoal progress "
"""The SSE comment a node streams while the answer waits (`mesh.api.progress`)."""


class _StatusLine:
    """The node's latest progress report, as one self-overwriting line on stderr until text arrives."""

    def __init__(self) -> None:
        self.width = 0

    def show(self, raw: bytes) -> None:
        try:
            message = str(orjson.loads(raw).get("message", ""))
        except (orjson.JSONDecodeError, AttributeError):
            return
        text = message.replace("\n", " ")[:100]
        sys.stderr.write("\r" + text.ljust(self.width))
        sys.stderr.flush()
        self.width = max(self.width, len(text))

    def clear(self) -> None:
        if self.width:
            sys.stderr.write("\r" + " " * self.width + "\r")
            sys.stderr.flush()
            self.width = 0


class _ProgressLine:
    """One self-overwriting progress line on stderr."""

    def __init__(self) -> None:
        self.shown = False

    def __call__(self, fraction: float, message: str = "") -> None:
        sys.stderr.write(f"\rpreparing model: {fraction * 100:5.1f}% {message[:60]:<60}")
        sys.stderr.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


async def _in_process(args: argparse.Namespace, config: NodeConfig) -> AsyncIterator[str]:
    from shoal.mesh.events import EventBus
    from shoal.mesh.node.model_manager import ModelManager, ModelNotFoundError
    from shoal.models.errors import ModelError
    from shoal.models.sampling import SamplingParams

    progress = _ProgressLine()
    manager = ModelManager(
        EventBus(),
        backend=config.models.backend,
        target=config.models.target,
        cache_dir=config.compile_dir,
        on_progress=progress,
    )
    manager.add_embedded()
    try:
        served = await manager.load(args.model or config.models.default)
    except ModelNotFoundError as exc:
        raise CommandError(str(exc)) from None
    except ModelError as exc:
        raise CommandError(f"cannot load the model: {exc}") from None
    finally:
        progress.close()
    try:
        loop = asyncio.get_running_loop()
        prompt_ids = await loop.run_in_executor(None, served.tokenizer.encode_chat, _messages(args))
        room = served.context_length - len(prompt_ids)
        if room < 1:
            raise CommandError(f"the prompt ({len(prompt_ids)} tokens) does not fit the model's context")
        params = SamplingParams(max_tokens=min(args.max_tokens, room), temperature=args.temperature)
        async for event in served.engine.stream(prompt_ids, params):
            if event.text:
                yield event.text
    finally:
        await manager.stop()
