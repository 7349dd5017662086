"""The ASGI app: /v1/completions (plain and server-sent events), /v1/models, /health, and a page at /.

Starlette, served by uvicorn: small, well kept, ASGI, with server-sent events as a StreamingResponse
and a graceful shutdown on SIGTERM (stop accepting, finish the requests in flight, exit). Handlers
only parse, queue rows for the Batcher and wait for their tokens on an asyncio queue, which the
decoding thread fills through the event loop; a client that goes away cancels its rows, and their
slots are free at the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from gptjax.inference.serve import api
from gptjax.inference.serve.batcher import Batcher, Request
from gptjax.inference.serve.playground import PAGE

MAX_BODY = 1 << 20  # bytes of a request body; past it, 413


def error(e: api.ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def _json_body(request: HttpRequest):
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise api.ApiError(f"the request body is over {MAX_BODY} bytes.", status=413)
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise api.ApiError(f"the request body is over {MAX_BODY} bytes.", status=413)
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise api.ApiError(f"the request body is not JSON: {e}.") from None


class Rows:
    """The Batcher rows of one request (prompt i's sample j is row i·n + j) and the queue of their events."""

    def __init__(self, batcher: Batcher, c: api.Completion):
        self.loop, self.events = asyncio.get_running_loop(), asyncio.Queue()
        self.rows = []
        for i, ids in enumerate(c.ids):
            for j in range(c.n):
                self.rows.append(Request(ids, c.max_tokens, c.temperature, c.top_k, c.top_p, c.seed + j, c.stops,
                                         self._emitter(len(self.rows)), logprobs=c.logprobs is not None,
                                         echo=c.echo))
        for r in self.rows:
            batcher.submit(r)

    def _emitter(self, index: int):
        return lambda *event: self.loop.call_soon_threadsafe(self.events.put_nowait, (index, *event))

    async def events_until_done(self):
        left = len(self.rows)
        try:
            while left:
                event = await self.events.get()
                left -= event[-1] is not None
                yield event
        finally:
            self.cancel()

    def cancel(self) -> None:
        for r in self.rows:
            r.cancelled = True


class Logprobs:
    """OpenAI's logprobs object of one choice: each token, its log-probability, the `n` likeliest tokens at its
    place (and the token itself, where it is not among them) and where its text begins; with `echo`, the prompt's
    tokens first, the first of them with no log-probability (nothing comes before it)."""

    def __init__(self, tokenizer, n: int):
        self.tokenizer, self.n, self.offset = tokenizer, n, 0
        self.tokens, self.logps, self.tops, self.offsets = [], [], [], []

    def _top(self, piece: str, logp: float, top) -> dict:
        out = {}
        for i, lp in top[:self.n]:
            out.setdefault(self.tokenizer.decode([i]), lp)
        out.setdefault(piece, logp)
        return out

    def add(self, ids, logps, tops) -> dict:
        start = len(self.tokens)
        for i, lp, top in zip(ids, logps, tops):
            piece = self.tokenizer.decode([i])
            self.tokens.append(piece), self.offsets.append(self.offset)
            self.logps.append(lp), self.tops.append(None if top is None else self._top(piece, lp, top))
            self.offset += len(piece)
        return self.since(start)

    def prompt(self, ids, scores) -> dict:
        """The prompt's tokens, their log-probabilities from the second on (`scores`, the Batcher's)."""
        lps, tops = scores
        return self.add(ids, [None, *lps], [None, *tops])

    def since(self, start: int = 0) -> dict:
        return {"tokens": self.tokens[start:], "token_logprobs": self.logps[start:],
                "top_logprobs": self.tops[start:], "text_offset": self.offsets[start:]}


class Server:
    def __init__(self, model, batcher: Batcher, name: str):
        self.model, self.batcher, self.name = model, batcher, name
        self.context = model.config.model.block_size

    def _parse(self, body) -> api.Completion:
        return api.parse_completion(body, self.model.tokenizer, self.context, self.batcher.n)

    async def completions(self, request: HttpRequest):
        try:
            c = self._parse(await _json_body(request))
        except api.ApiError as e:
            return error(e)
        rows = Rows(self.batcher, c)
        if c.stream:
            return StreamingResponse(self._stream(c, rows), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            return JSONResponse(await self._whole(c, rows))
        except api.ApiError as e:
            return error(e)

    def _failed(self) -> api.ApiError:
        return api.ApiError(f"the server failed: {self.batcher.failure}; restart it.", status=500,
                            kind="server_error")

    def _logprobs(self, c: api.Completion) -> list[Logprobs | None]:
        n = len(c.ids) * c.n
        return [Logprobs(self.model.tokenizer, c.logprobs) if c.logprobs is not None else None for _ in range(n)]

    def _echo(self, c: api.Completion, rows: Rows, k: int, lp: Logprobs | None) -> tuple[str, dict | None]:
        """Row k's prompt as its choice begins with `echo`, and its logprobs (at the row's first event, when the
        Batcher has scored the prompt)."""
        if not c.echo:
            return "", None
        scores = rows.rows[k].prompt_scores
        return c.prompts[k // c.n], lp.prompt(c.ids[k // c.n], scores) if lp and scores else None

    async def _whole(self, c: api.Completion, rows: Rows) -> dict:
        lps = self._logprobs(c)
        texts, reasons = [None] * len(lps), [None] * len(lps)
        async for k, ids, logps, tops, text, reason in rows.events_until_done():
            if texts[k] is None:
                texts[k] = self._echo(c, rows, k, lps[k])[0]
            texts[k] += text
            reasons[k] = reason or reasons[k]
            if lps[k]:
                lps[k].add(ids, logps, tops)
        if "error" in reasons:
            raise self._failed()
        choices = [api.choice(k, texts[k], reasons[k], lp.since() if lp else None) for k, lp in enumerate(lps)]
        return api.envelope(api.new_id(), self.name, choices, self._usage(c, rows))

    def _usage(self, c: api.Completion, rows: Rows) -> dict:
        prompt_tokens = sum(len(ids) for ids in c.ids) * c.n
        return api.usage(prompt_tokens, sum(r.tokens for r in rows.rows))

    async def _stream(self, c: api.Completion, rows: Rows):
        cid, lps, sent = api.new_id(), self._logprobs(c), {}
        sse = lambda choices, **kw: f"data: {json.dumps(api.envelope(cid, self.name, choices, **kw))}\n\n"  # noqa: E731
        async for k, ids, logps, tops, text, reason in rows.events_until_done():
            if reason == "error":
                yield f"data: {json.dumps(self._failed().body())}\n\ndata: [DONE]\n\n"
                return
            if k not in sent:  # the row's first event: its echo first
                echo, lp = self._echo(c, rows, k, lps[k])
                sent[k] = len(lps[k].tokens) if lps[k] else 0
                if echo:
                    yield sse([api.choice(k, echo, None, lp)])
            if lps[k]:
                lps[k].add(ids, logps, tops)
            if text or reason:  # the logprobs of tokens whose text a stop string held back come with the text
                yield sse([api.choice(k, text, reason, lps[k].since(sent[k]) if lps[k] else None)])
                sent[k] = len(lps[k].tokens) if lps[k] else 0
        if c.include_usage:
            yield sse([], usage=self._usage(c, rows))
        yield "data: [DONE]\n\n"

    async def models(self, request: HttpRequest):
        return JSONResponse({"object": "list", "data": [{"id": self.name, "object": "model", "created": 0,
                                                         "owned_by": "gptjax"}]})

    async def tokenizer_info(self, request: HttpRequest):
        return JSONResponse(api.tokenizer_info(self.model.tokenizer, self.context))

    async def tokenize(self, request: HttpRequest):
        try:
            return JSONResponse(api.tokenize(await _json_body(request), self.model.tokenizer, self.context))
        except api.ApiError as e:
            return error(e)

    async def detokenize(self, request: HttpRequest):
        try:
            return JSONResponse(api.detokenize(await _json_body(request), self.model.tokenizer))
        except api.ApiError as e:
            return error(e)

    async def health(self, request: HttpRequest):
        if self.batcher.failure:
            return error(api.ApiError(f"the server failed: {self.batcher.failure}.", status=503, kind="server_error"))
        return JSONResponse({"status": "ok", "busy_slots": self.batcher.busy(), "slots": self.batcher.n})

    async def playground(self, request: HttpRequest):
        return HTMLResponse(PAGE)

    async def chat(self, request: HttpRequest):
        return error(api.ApiError("this model has no chat template, so /v1/chat/completions is not served; "
                                  "use /v1/completions with a prompt.", "messages"))


class Auth:
    """ASGI middleware: with an API key, every path but /health and the page at / needs `Authorization: Bearer
    KEY`, checked first (the page sends the key its user types in)."""

    def __init__(self, app, key: str | None):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if self.key and scope["type"] == "http" and scope["path"] not in ("/health", "/"):
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.key}".encode()):
                e = api.ApiError("a valid API key is required: Authorization: Bearer KEY.", status=401,
                                 code="invalid_api_key")
                return await error(e)(scope, receive, send)
        await self.app(scope, receive, send)


async def _http_error(request, exc: HTTPException):
    return error(api.ApiError(f"{request.method} {request.url.path}: {exc.detail}.", status=exc.status_code))


async def _internal(request, exc: Exception):
    return error(api.ApiError(f"the server failed: {type(exc).__name__}.", status=500, kind="server_error"))


def make_app(model, batcher: Batcher, name: str, api_key: str | None = None):
    s = Server(model, batcher, name)
    routes = [Route("/v1/completions", s.completions, methods=["POST"]), Route("/v1/models", s.models),
              Route("/health", s.health), Route("/v1/chat/completions", s.chat, methods=["POST"]),
              Route("/tokenizer_info", s.tokenizer_info), Route("/tokenize", s.tokenize, methods=["POST"]),
              Route("/detokenize", s.detokenize, methods=["POST"]), Route("/", s.playground)]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error, Exception: _internal})
    return Auth(app, api_key)
