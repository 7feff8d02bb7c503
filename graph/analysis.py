"""The analysis step: its plug-in contract and the default deterministic analyzer.

The ``adaptive_processor`` deepens a workflow's analysis one pass at a time. The work
itself is done by an :data:`Analyzer`: an async callable that takes an
:class:`AnalysisRequest` and returns an :class:`AnalysisResult`. ctxd ships
:func:`heuristic_analyzer` (text statistics, no model, no network, exact in tests);
users name their own with an import path, loaded by :func:`load_analyzer`, to put a
language model there. ``examples/keyword_analyzer.py`` is a plug-in to start from.

An analyzer should be deterministic for a given request where it can (replays and
retries then reproduce the same analysis) and keep its output bounded: the analysis is
stored in every checkpoint and scored by :func:`graph.quality.quality_score`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TypeAlias, cast

from graph.errors import ConfigError
from graph.features import split_sentences, terms

__all__ = [
    "MAX_ANALYSIS_BYTES",
    "AnalysisRequest",
    "AnalysisResult",
    "Analyzer",
    "FieldValue",
    "heuristic_analyzer",
    "load_analyzer",
]

FieldValue: TypeAlias = str | int | float | bool
"""A value of :attr:`AnalysisResult.fields`: plain, so it fits a stream field or span attribute."""

MAX_ANALYSIS_BYTES = 4096
"""Upper bound, in UTF-8 bytes, of :func:`heuristic_analyzer`'s analysis."""


@dataclass(frozen=True)
class AnalysisRequest:
    """What an analyzer gets for one pass.

    Attributes:
        workflow_id: the workflow (LangGraph thread) being analysed.
        window: the context window's texts, oldest first; the newest is the current
            event's content.
        previous_analysis: the analysis so far ("" before the first pass of a workflow).
        pass_number: 0 for an event's first analysis, one more for each deepening pass.
        research: research findings by domain (``technical``…), possibly empty.
    """

    workflow_id: str
    window: tuple[str, ...]
    previous_analysis: str = ""
    pass_number: int = 0
    research: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.pass_number, bool) or not (
            isinstance(self.pass_number, int) and self.pass_number >= 0
        ):
            raise ValueError(f"pass_number = {self.pass_number!r}: expected an integer >= 0")
        if not isinstance(self.window, tuple):
            raise TypeError(f"window must be a tuple of texts, not {type(self.window).__name__}")


@dataclass(frozen=True)
class AnalysisResult:
    """What an analyzer returns.

    Attributes:
        analysis: the new analysis text; it replaces the previous one.
        fields: optional extra facts (``keywords=3``…), kept with the event's result.
    """

    analysis: str
    fields: Mapping[str, FieldValue] = field(default_factory=dict)


Analyzer: TypeAlias = Callable[[AnalysisRequest], Awaitable[AnalysisResult]]
"""The plug-in signature: ``async def analyze(request: AnalysisRequest) -> AnalysisResult``."""

# --- the heuristic analyzer -----------------------------------------------------------

# Below this, deeper passes have nothing to work with and the analysis stays short, so
# its quality stays low and the routing engine sees a thin analysis for what it is.
_MIN_TERMS = 8
_MIN_SENTENCES = 2

_QUOTE_BYTES = 120
_TERM_BYTES = 24
_TOP_TERMS = 6
_FINDINGS = 3
_EVIDENCE = 2
_RESEARCH_BULLETS = 4
_NEW_TERMS = 4


def _clip(text: str, max_bytes: int) -> str:
    """Collapse white space and cut to ``max_bytes`` of UTF-8, marking a cut with ``…``."""
    text = " ".join(text.split())
    encoded = text.encode("utf-8")
    if len(encoded) <= max_bytes:
        return text
    ellipsis = "…"
    room = max_bytes - len(ellipsis.encode("utf-8"))
    return encoded[:room].decode("utf-8", errors="ignore").rstrip() + ellipsis


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


@dataclass(frozen=True)
class _Digest:
    """Statistics of a window, computed once per request."""

    counts: Counter[str]
    ranked_terms: tuple[tuple[str, int], ...]
    sentences: tuple[str, ...]
    latest_sentences: tuple[str, ...]
    new_terms: tuple[str, ...]

    @classmethod
    def of(cls, window: Sequence[str]) -> _Digest:
        counts: Counter[str] = Counter()
        for text in window:
            counts.update(terms(text))
        # Most frequent first; ties in alphabetical order, so the order is the same
        # in every process (Counter.most_common keeps insertion order on ties).
        ranked = tuple(sorted(counts.items(), key=lambda item: (-item[1], item[0])))
        sentences = tuple(sentence for text in window for sentence in split_sentences(text))
        latest = split_sentences(window[-1]) if window else ()
        earlier: set[str] = set()
        for text in window[:-1]:
            earlier.update(terms(text))
        latest_terms = terms(window[-1]) if window else Counter[str]()
        new = tuple(
            term
            for term, _ in sorted(latest_terms.items(), key=lambda item: (-item[1], item[0]))
            if term not in earlier
        )
        return cls(counts, ranked, sentences, latest, new)

    @property
    def substantive(self) -> bool:
        return len(self.counts) >= _MIN_TERMS and len(self.sentences) >= _MIN_SENTENCES

    def salient(self, sentences: Sequence[str], limit: int) -> list[str]:
        """The sentences whose distinct terms are most frequent in the window."""
        scored = [
            (-sum(self.counts[term] for term in terms(sentence)), position)
            for position, sentence in enumerate(sentences)
        ]
        return [sentences[position] for _, position in sorted(scored)[:limit]]

    def term_list(self, limit: int) -> str:
        return ", ".join(_clip(term, _TERM_BYTES) for term, _ in self.ranked_terms[:limit])


def _summary(request: AnalysisRequest, digest: _Digest) -> list[str]:
    events = len(request.window)
    key_terms = ", ".join(
        f"{_clip(term, _TERM_BYTES)} ({count})" for term, count in digest.ranked_terms[:_TOP_TERMS]
    )
    latest = _clip(digest.latest_sentences[0], _QUOTE_BYTES) if digest.latest_sentences else "none"
    return [
        f"Analysis of {_plural(events, 'event')} (pass {request.pass_number}): "
        f"{_plural(len(digest.sentences), 'sentence')}, "
        f"{_plural(len(digest.counts), 'distinct term')}.",
        f"Key terms: {key_terms or 'none'}.",
        f"Latest event: {latest}",
    ]


def _research(research: Mapping[str, str]) -> list[str]:
    bullets: list[str] = []
    for domain in sorted(research):
        lines = [line.strip() for line in research[domain].splitlines()]
        # A worker's "- " or "• " bullets are its findings; without bullets, every line is.
        marked = [line[2:] for line in lines if line.startswith(("- ", "• "))]
        for text in marked or lines:
            if text.strip() and len(bullets) < _RESEARCH_BULLETS:
                bullets.append(f"- {_clip(domain, _TERM_BYTES)}: {_clip(text, _QUOTE_BYTES)}")
    return ["Research:", *bullets] if bullets else []


def _findings(digest: _Digest) -> list[str]:
    lines = ["Findings:"]
    lines.extend(f"• {_clip(s, _QUOTE_BYTES)}" for s in digest.salient(digest.sentences, _FINDINGS))
    quotes = digest.salient(digest.latest_sentences, _EVIDENCE)
    if quotes:
        lines.append("Evidence from the latest event:")
        lines.extend(f'- "{_clip(quote, _QUOTE_BYTES)}"' for quote in quotes)
    else:
        lines.append("Evidence from the latest event: none, it has no sentence.")
    return lines


def _reasoning(request: AnalysisRequest, digest: _Digest) -> list[str]:
    if len(request.window) < 2:
        contrast = "this is the first event in the window, so there is no earlier context."
    elif digest.new_terms:
        new = ", ".join(_clip(term, _TERM_BYTES) for term in digest.new_terms[:_NEW_TERMS])
        contrast = f"the latest event brings new terms: {new}."
    else:
        contrast = "the latest event adds no new terms to the context."
    top_term, top_count = digest.ranked_terms[0]
    if request.research:
        advice = "act on the research findings above, then decide."
    elif digest.new_terms and len(request.window) >= 2:
        advice = (
            f"watch whether {_clip(digest.new_terms[0], _TERM_BYTES)} persists in coming events."
        )
    else:
        advice = "keep monitoring; the context is stable."
    return [
        f"However, {contrast}",
        f"Therefore, the context centres on {digest.term_list(3)}.",
        f"Conclusion: {_plural(len(digest.sentences), 'sentence')} over "
        f"{_plural(len(request.window), 'event')}, led by {_clip(top_term, _TERM_BYTES)} "
        f"({_plural(top_count, 'mention')}).",
        f"Recommendation: {advice}",
    ]


def _coverage(digest: _Digest) -> list[str]:
    mentions = sum(digest.counts.values())
    top = sum(count for _, count in digest.ranked_terms[:3])
    share = round(100 * top / mentions)
    per_sentence = mentions / len(digest.sentences)
    return [
        f"Furthermore, the top three terms make up {share}% of {_plural(mentions, 'mention')}.",
        f"Moreover, sentences carry {per_sentence:.1f} content terms on average.",
        f"Consequently, the window holds {_plural(len(digest.counts), 'distinct term')}.",
    ]


def _render(request: AnalysisRequest) -> tuple[str, _Digest]:
    digest = _Digest.of(request.window)
    lines = _summary(request, digest)
    lines.extend(_research(request.research))
    if request.pass_number >= 1:
        if digest.substantive:
            lines.extend(_findings(digest))
        else:
            lines.append(
                f"Too little content to go deeper: {_plural(len(digest.counts), 'distinct term')}"
                f" and {_plural(len(digest.sentences), 'sentence')}"
                f" (needs {_MIN_TERMS} and {_MIN_SENTENCES})."
            )
    if request.pass_number >= 2 and digest.substantive:
        lines.extend(_reasoning(request, digest))
    if request.pass_number >= 3 and digest.substantive:
        lines.extend(_coverage(digest))
    # The parts above are bounded to well under the limit; this is a last guard only.
    return _clip_lines("\n".join(lines), MAX_ANALYSIS_BYTES), digest


def _clip_lines(text: str, max_bytes: int) -> str:
    encoded = text.encode("utf-8")
    if len(encoded) <= max_bytes:
        return text
    return encoded[:max_bytes].decode("utf-8", errors="ignore")


async def heuristic_analyzer(request: AnalysisRequest) -> AnalysisResult:
    """The default analyzer: deterministic text statistics, no model.

    Each pass keeps every line of the pass before and adds depth, so the seed's quality
    score never falls from one pass to the next:

    - pass 0: a summary (events, sentences, distinct terms), the top terms by frequency
      (ties alphabetical) and the latest event's leading sentence;
    - pass 1: ``Findings:`` bullets (the window's most salient sentences) and
      ``Evidence`` quoted from the latest event;
    - pass 2: ``However``/``Therefore`` reasoning, a ``Conclusion:`` and a
      ``Recommendation:``;
    - pass 3 and later: coverage statistics.

    Research findings, when given, are folded in as bullets at every pass. A window
    with fewer than 8 distinct terms or 2 sentences is too thin to deepen: later passes
    only say so, and its quality stays low. ``previous_analysis`` is not used: each pass
    is recomputed from the window, so replays agree. The analysis is at most
    :data:`MAX_ANALYSIS_BYTES` of UTF-8 whatever the input size.

    Args:
        request: the window, the pass number and any research findings.

    Returns:
        The analysis, with fields ``sentences``, ``distinct_terms`` and ``substantive``.
    """
    analysis, digest = _render(request)
    return AnalysisResult(
        analysis,
        {
            "sentences": len(digest.sentences),
            "distinct_terms": len(digest.counts),
            "substantive": digest.substantive,
        },
    )


# --- loading a plug-in ----------------------------------------------------------------

_EXPECTED = "async def <name>(request: AnalysisRequest) -> AnalysisResult"
_MODULE_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def _import_file(path_text: str, spec: str) -> ModuleType:
    path = Path(path_text).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"analyzer {spec!r}: no file {str(path)!r}; check the path")
    digest = hashlib.sha256(str(path).encode("utf-8")).hexdigest()[:12]
    stem = re.sub(r"\W", "_", path.stem)
    name = f"ctxd_plugin_{stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"analyzer {spec!r}: {str(path)!r} cannot be loaded as Python")
    module = importlib.util.module_from_spec(module_spec)
    # Registered before running it, as an import would: dataclasses and pickling look
    # their module up in sys.modules.
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise ConfigError(
            f"analyzer {spec!r}: running {str(path)!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    return module


def _import_module(module_name: str, spec: str) -> ModuleType:
    if not _MODULE_PATH.match(module_name):
        raise ConfigError(
            f"analyzer {spec!r}: {module_name!r} is neither a module name "
            "('package.module') nor a file ending in '.py'"
        )
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(f"{missing}."):
            raise ConfigError(
                f"analyzer {spec!r}: no module named {missing!r}; "
                "is it installed, or on PYTHONPATH?"
            ) from exc
        raise ConfigError(f"analyzer {spec!r}: importing {module_name!r} failed: {exc}") from exc
    except Exception as exc:
        raise ConfigError(
            f"analyzer {spec!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc


def _is_coroutine_function(target: object) -> bool:
    return inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(
        getattr(target, "__call__", None)  # noqa: B004 -- async __call__ of an instance
    )


def load_analyzer(path: str) -> Analyzer:
    """Load an analyzer plug-in named by an import path.

    Two forms are accepted:

    - ``"package.module:function"``: the module is imported as usual (it must be
      installed or on ``sys.path``);
    - ``"path/to/file.py:function"``: the file is loaded as a module of its own
      (relative paths are taken from the current directory), so a plug-in needs no
      packaging. The text before the last ``:`` is taken as a file when it ends in
      ``.py``.

    The target must be a coroutine function (or an object with an ``async def
    __call__``) taking one ``AnalysisRequest`` and returning an ``AnalysisResult``.

    Args:
        path: the import path.

    Returns:
        The analyzer.

    Raises:
        ConfigError: the path is malformed, the module or file cannot be imported, the
            attribute is missing, not callable, not async, or does not take exactly one
            argument; the message names the path and the expected signature.
    """
    module_part, colon, attribute = path.strip().rpartition(":")
    if not colon or not module_part or not attribute.isidentifier():
        raise ConfigError(
            f"analyzer {path!r}: expected 'package.module:function' or 'path/to/file.py:function'"
        )
    if module_part.endswith(".py"):
        module = _import_file(module_part, path)
    else:
        module = _import_module(module_part, path)
    try:
        target: object = getattr(module, attribute)
    except AttributeError:
        raise ConfigError(
            f"analyzer {path!r}: {module_part!r} has no attribute {attribute!r}; "
            f"expected {_EXPECTED}"
        ) from None
    if not callable(target):
        raise ConfigError(
            f"analyzer {path!r}: {attribute!r} is a {type(target).__name__}, not callable; "
            f"expected {_EXPECTED}"
        )
    if not _is_coroutine_function(target):
        raise ConfigError(
            f"analyzer {path!r}: {attribute!r} is not a coroutine function; expected {_EXPECTED}"
        )
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # no introspectable signature: trust the target
        signature = None
    if signature is not None:
        try:
            signature.bind(None)
        except TypeError:
            raise ConfigError(
                f"analyzer {path!r}: {attribute!r} has signature {signature}, which does not "
                f"take exactly one argument; expected {_EXPECTED}"
            ) from None
    return cast(Analyzer, target)
