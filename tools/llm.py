"""The LLM behind the agent: a local transformers model, or any OpenAI-compatible server (vLLM, llama.cpp).

Both take the chats of one stage and return one reply each: `generate(conversations, seed) -> [str]`. With
agent.constrained the reply is forced into a well-formed Weights line (a logits processor for transformers,
vLLM's guided_regex for a server). A server that cannot answer raises AgentError, and the stage falls back.
"""
import http.client
import json
import os
import re
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import torch

from tools.configurator import ConfigError
from tools.doctor import resolve_model_path

MAX_REPLY_BYTES = 2**24  # a chat answer is kilobytes; a server sending more is broken


class AgentError(RuntimeError):
    """The LLM could not be reached or failed: the stage falls back, the run goes on."""


def weights_line_ok(text, count, min_weight, max_weight, complete=False):
    """Is `text` the start (or, with complete=True, all) of `count` numbers x:y:z, each of at most 6 characters in
    [min_weight, max_weight], not all 0? A started number must still be able to end inside the range."""
    parts = text.split(":")
    if len(parts) > count or (complete and len(parts) != count):
        return False
    for k, part in enumerate(parts):
        done = complete or k < len(parts) - 1
        if not re.fullmatch(r"\d+(\.\d+)?" if done else r"(\d+(\.\d*)?)?", part) or len(part) > 6:
            return False
        low = float(part.rstrip(".") or 0)  # the smallest value this number can still take, and the largest
        high = low if done else float(part.ljust(6, "9"))
        if low > max_weight or high < min_weight:
            return False
    return not complete or any(float(p) > 0 for p in parts)


class WeightsLineProcessor:
    """A transformers logits processor: after the forced prefix 'Weights: A:B:C=', only the tokens that keep the
    text a valid weights line may come, and the end only once it is complete. So every reply parses."""

    def __init__(self, tokenizer, pieces, count, min_weight, max_weight, prompt_len, eos_ids):
        self.tokenizer, self.pieces, self.count = tokenizer, pieces, count
        self.prompt_len, self.eos_ids = prompt_len, eos_ids
        self.bounds = (min_weight, max_weight)

    @staticmethod
    def digit_pieces(tokenizer):
        """(token id, text) of the tokens that are digits, '.' and ':' only: the tokens a weights line is made of."""
        ids = sorted(tokenizer.get_vocab().values())
        texts = tokenizer.batch_decode([[i] for i in ids])
        return [(i, p) for i, p in zip(ids, texts) if p and set(p) <= set("0123456789.:")]

    def __call__(self, input_ids, scores):  # input_ids [B, prompt_len + generated], scores [B, vocab]
        mask = torch.full_like(scores, float("-inf"))
        for row in range(input_ids.shape[0]):
            text = self.tokenizer.decode(input_ids[row, self.prompt_len:], skip_special_tokens=True)
            allowed = [i for i, p in self.pieces if weights_line_ok(text + p, self.count, *self.bounds)]
            if weights_line_ok(text, self.count, *self.bounds, complete=True):
                allowed += self.eos_ids
            if torch.isinf(scores[row, allowed]).all():  # top-p/top-k removed them all: choose among them evenly
                scores[row, allowed] = 0.0
            mask[row, allowed] = 0.0
        return scores + mask


def shared_start(rows):
    """How many leading tokens all token-id rows share, leaving every row at least one token of its own."""
    shared = 0
    while len(rows) > 1 and shared < min(map(len, rows)) - 1 and len({r[shared] for r in rows}) == 1:
        shared += 1
    return shared


class TransformersLLM:
    """A local Hugging Face model (directory, cached hub id, or GGUF file); all prompts of a stage in one batch."""

    def __init__(self, cfg, device, names, min_weight, max_weight):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        path = resolve_model_path(cfg.model)
        extra = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
        dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, **extra)
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra).to(device).eval()
        except OSError as e:
            raise FileNotFoundError(f"cannot load the LLM '{cfg.model}' ({e.__class__.__name__}: {str(e).splitlines()[0]}). "
                                    "Give agent.model as a local directory, or download it where there is internet "
                                    f"(`huggingface-cli download {cfg.model}`) into the Hugging Face cache") from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.cfg, self.device, self.names, self.bounds = cfg, device, names, (min_weight, max_weight)
        self.pieces = None  # the vocabulary's digit pieces, for constrained decoding

    def to(self, device):
        self.model.to(device)
        self.device = device

    def generate(self, conversations, seed):
        # Constrained: the reply starts with the Weights line, whose numbers the processor keeps well-formed.
        prefix = f"Weights: {':'.join(self.names)}=" if self.cfg.constrained else ""
        texts = [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) + prefix
                 for c in conversations]
        rows = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        shared = shared_start(rows) if self.cfg.share_prefix else 0
        # Left padding, with the shared start kept in front: [shared | pads | rest]. The attention mask hides the
        # pads, and the positions count unmasked tokens only, so every row reads as if it were alone.
        pad, width = self.tokenizer.pad_token_id, max(map(len, rows))
        input_ids = torch.tensor([r[:shared] + [pad] * (width - len(r)) + r[shared:] for r in rows], device=self.device)
        mask = torch.tensor([[1] * shared + [0] * (width - len(r)) + [1] * (len(r) - shared) for r in rows], device=self.device)
        sampling = dict(do_sample=True, temperature=self.cfg.temperature, top_p=self.cfg.top_p) if self.cfg.do_sample else dict(do_sample=False)
        if self.cfg.constrained:
            eos = self.model.generation_config.eos_token_id
            eos_ids = eos if isinstance(eos, list) else [eos if eos is not None else self.tokenizer.eos_token_id]
            # Once per run: decoding the whole vocabulary (Llama-3's 128k tokens) again every stage is wasted work.
            self.pieces = self.pieces or WeightsLineProcessor.digit_pieces(self.tokenizer)
            sampling["logits_processor"] = [WeightsLineProcessor(self.tokenizer, self.pieces, len(self.names), *self.bounds,
                                                                 width, eos_ids)]
            sampling["max_new_tokens"] = 7 * len(self.names) + 1  # each number has at most 6 characters
        # Sampling draws from torch's global RNG: fork it so the agent neither disturbs training
        # nor depends on it, and seed it by stage so a resumed run samples the same replies.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), torch.no_grad():
            if shared:
                # The shared start is read once, and its key/value cache copied to every row.
                from transformers import DynamicCache
                cache = DynamicCache(config=self.model.config)
                self.model(input_ids=input_ids[:1, :shared], past_key_values=cache, use_cache=True)
                cache.batch_repeat_interleave(len(rows))
                sampling["past_key_values"] = cache
            torch.manual_seed(seed)
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, pad_token_id=pad,
                                      **{"max_new_tokens": self.cfg.max_new_tokens, **sampling})
        return [prefix + self.tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]  # out: [B, width + new]


class OpenAILLM:
    """Any OpenAI-compatible /v1/chat/completions server (vLLM, llama.cpp server, ...)."""

    def __init__(self, cfg, names):
        base = cfg.base_url or os.environ.get("OPENAI_BASE_URL", "")
        if not base:
            raise ConfigError("agent.base_url is empty and $OPENAI_BASE_URL is not set: give the server's URL, "
                              "e.g. http://127.0.0.1:8000/v1")
        self.url = base.rstrip("/") + "/chat/completions"
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"agent.base_url = {base!r} is not a server URL: write it like http://127.0.0.1:8000/v1")
        self.key = cfg.api_key or os.environ.get("OPENAI_API_KEY", "")
        self.cfg = cfg
        number = r"\d{1,3}(\.\d{1,4})?"
        # vLLM's guided decoding: the reply must match this (a regex cannot bound the values; the parser does).
        self.regex = rf"Weights: {re.escape(':'.join(names))}={number}(:{number}){{{len(names) - 1}}}\nThoughts: [^\n]{{0,300}}"

    def to(self, device):
        pass

    def post(self, body, headers):
        """One request, whole within agent.timeout seconds: connecting, the status line and every read of the body
        share that deadline, so a server that trickles its answer is cut off like one that hangs. Returns (status,
        body bytes); a body over MAX_REPLY_BYTES is an error."""
        deadline = time.monotonic() + self.cfg.timeout

        def remaining():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no whole answer within {self.cfg.timeout:g} s")
            return left

        url = urllib.parse.urlsplit(self.url)
        connection = (http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection)(
            url.hostname, url.port, timeout=remaining())
        try:
            connection.request("POST", url.path + (f"?{url.query}" if url.query else ""), json.dumps(body).encode(), headers)
            sock = connection.sock  # the response reads from it (the connection lets go of it when the server closes)
            sock.settimeout(remaining())
            response = connection.getresponse()
            chunks, size = [], 0
            while True:
                sock.settimeout(remaining())
                chunk = response.read1(65536)
                if not chunk:
                    if response.length:  # the server closed before the Content-Length it announced
                        raise http.client.IncompleteRead(b"".join(chunks), response.length)
                    return response.status, b"".join(chunks)
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_REPLY_BYTES:
                    raise ValueError(f"the answer is over {MAX_REPLY_BYTES} bytes")
        finally:
            connection.close()

    def ask(self, messages, seed):
        body = {"model": self.cfg.model, "messages": messages, "max_tokens": self.cfg.max_new_tokens, "seed": seed,
                "temperature": self.cfg.temperature if self.cfg.do_sample else 0.0, "top_p": self.cfg.top_p}
        if self.cfg.constrained:
            body["guided_regex"] = self.regex
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        error = None
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                time.sleep(min(2 ** (attempt - 1), 30))
            try:
                status, data = self.post(body, headers)
                if status != 200:
                    error = f"HTTP {status}: {data[:200].decode(errors='replace')}"
                    if status not in (408, 429) and status < 500:
                        break  # a client error does not go away by retrying
                    continue
                reply = json.loads(data)["choices"][0]["message"]["content"]
                if not isinstance(reply, str):
                    raise TypeError(f"the reply's content is {type(reply).__name__}, not text")
                return reply
            # Whatever the server or the network does, the request ends in an error record, never a crash:
            # OSError (refused, reset, timeouts), http.client.HTTPException (a malformed status line, a body shorter
            # than its Content-Length), ValueError (not JSON, not UTF-8), RecursionError (JSON nested too deep),
            # and KeyError, IndexError, TypeError (JSON of another shape).
            except (OSError, http.client.HTTPException, ValueError, RecursionError, KeyError, IndexError, TypeError) as e:
                error = f"{e.__class__.__name__}: {str(e)[:200]}"
        raise AgentError(f"the LLM server at {self.url} failed after {attempt + 1} tries ({error}); "
                         "check that it is running and agent.base_url / agent.model are right")

    def generate(self, conversations, seed):
        with ThreadPoolExecutor(max_workers=max(1, self.cfg.concurrency)) as pool:
            return list(pool.map(lambda c: self.ask(c, seed), conversations))
