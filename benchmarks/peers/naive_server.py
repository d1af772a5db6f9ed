"""The naive baseline: one request at a time over transformers' `generate`, streamed.

    python benchmarks/peers/naive_server.py --model-dir DIR --port 8003 [--dtype float32] [--device auto]

What a first attempt at serving looks like: no batching, no paged cache, the
model's own `generate` in a thread and a `TextIteratorStreamer` turning its
tokens into text pieces. It serves OpenAI's streaming `/v1/completions` (with
`max_tokens`, `temperature`, `ignore_eos`/`min_tokens` and usage) so the load
generator drives it exactly like the other peers. Requests queue on one lock.
Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator

import torch
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)


class StopWhenSet(StoppingCriteria):
    """Ends `generate` once the client has gone, so the next request does not share the CPU."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class NaiveEngine:
    """A model, its tokenizer, and a lock making requests take turns."""

    def __init__(self, model_dir: str, dtype: torch.dtype, name: str, device: str = "cpu") -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        self.device = device
        self.name = name
        self.lock = asyncio.Lock()

    def generate_kwargs(self, body: dict, input_ids: torch.Tensor, streamer: TextIteratorStreamer) -> dict:
        max_tokens = int(body.get("max_tokens") or 16)
        temperature = float(body.get("temperature", 1.0) or 0.0)
        min_tokens = max_tokens if body.get("ignore_eos") else int(body.get("min_tokens") or 0)
        kwargs = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "streamer": streamer,
            "max_new_tokens": max_tokens,
            "min_new_tokens": min(min_tokens, max_tokens),
            "pad_token_id": self.tokenizer.eos_token_id,
        }
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=float(body.get("top_p", 1.0)))
        else:
            kwargs.update(do_sample=False)
        return kwargs

    async def stream(self, body: dict) -> AsyncIterator[bytes]:
        """Generate under the lock; yield OpenAI completion chunks as SSE lines."""
        async with self.lock:
            input_ids = self.tokenizer(str(body.get("prompt", "")), return_tensors="pt").input_ids.to(self.device)
            streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
            outputs: list[torch.Tensor] = []
            failures: list[str] = []
            gone = threading.Event()

            def run() -> None:
                kwargs = self.generate_kwargs(body, input_ids, streamer)
                try:
                    with torch.inference_mode():
                        outputs.append(
                            self.model.generate(**kwargs, stopping_criteria=StoppingCriteriaList([StopWhenSet(gone)]))
                        )
                except Exception as exc:  # noqa: BLE001 - reported to the client, not lost in a thread
                    failures.append(f"{type(exc).__name__}: {exc}")
                    streamer.end()  # a failed generate must not leave the stream waiting forever

            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            rid = f"cmpl-{uuid.uuid4().hex}"
            iterator = iter(streamer)
            try:
                while True:
                    piece = await asyncio.to_thread(next, iterator, None)
                    if piece is None:
                        break
                    if piece:
                        yield self.chunk(rid, piece, None)
            finally:
                gone.set()
                await asyncio.to_thread(thread.join)
            if failures:
                yield sse({"error": {"message": failures[0], "type": "server_error"}})
                return
            generated = outputs[0].shape[1] - input_ids.shape[1] if outputs else 0
            yield self.chunk(rid, "", "length" if generated >= int(body.get("max_tokens") or 16) else "stop")
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {
                    "prompt_tokens": input_ids.shape[1],
                    "completion_tokens": generated,
                    "total_tokens": input_ids.shape[1] + generated,
                }
                yield sse(
                    {
                        "id": rid,
                        "object": "text_completion",
                        "created": int(time.time()),
                        "model": self.name,
                        "choices": [],
                        "usage": usage,
                    }
                )
            yield b"data: [DONE]\n\n"

    def chunk(self, rid: str, text: str, finish: str | None) -> bytes:
        return sse(
            {
                "id": rid,
                "object": "text_completion",
                "created": int(time.time()),
                "model": self.name,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            }
        )


def sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def create_app(engine: NaiveEngine) -> Starlette:
    async def completions(request: Request):
        body = await request.json()
        if not body.get("stream"):
            return JSONResponse({"error": "this baseline serves streaming requests only"}, status_code=400)
        return StreamingResponse(engine.stream(body), media_type="text/event-stream")

    async def health(_request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def models(_request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": engine.name, "object": "model"}]})

    return Starlette(
        routes=[
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/v1/models", models, methods=["GET"]),
        ]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True, help="a local model directory (never a hub id)")
    p.add_argument("--served-model-name", default="smollm2")
    p.add_argument("--port", type=int, default=8003)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when torch sees a GPU)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    engine = NaiveEngine(args.model_dir, getattr(torch, args.dtype), args.served_model_name, device)
    uvicorn.run(create_app(engine), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
