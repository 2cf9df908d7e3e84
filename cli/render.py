"""How one reply looks in the terminal while it streams, and the stats line after it.

TTY: a Rich Live view. The chain-of-thought is hidden behind a "thinking… N tokens" spinner (OpenAI advises
not to show it to end users) or, when shown, streamed dimmed in its own indented block; the answer streams
as Markdown underneath and stays on screen as the final rendering. Not a TTY: nothing but the final answer,
as plain text, once the reply is complete.
"""

from __future__ import annotations

from rich.console import Console, Group
from rich.live import Live
from rich.markdown import Markdown
from rich.padding import Padding
from rich.spinner import Spinner
from rich.text import Text


class ReplyView:
    """Feed it the engine's events (kind "reasoning" / "content" / "tool_call" / "done") as they come."""

    def __init__(self, console: Console, *, show_reasoning: bool, plain: bool):
        self.console, self.show_reasoning, self.plain = console, show_reasoning, plain
        self.reasoning_text, self.content_text = "", ""
        self.reasoning_tokens = 0
        self.notes: list[str] = []
        self.interrupted = False
        self.live: Live | None = None
        self.final = False

    def __enter__(self) -> "ReplyView":
        if not self.plain:
            # get_renderable: the Markdown is parsed at the refresh rate in Live's thread, not once per token.
            self.live = Live(console=self.console, get_renderable=self._view, refresh_per_second=12,
                             transient=False, vertical_overflow="visible")
            self.live.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is KeyboardInterrupt:
            self.interrupted = True
        if self.live is not None:
            self.final = True
            self.live.refresh()
            self.live.__exit__(None, None, None)
        elif self.content_text and not self.interrupted:
            print(self.content_text.strip(), flush=True)
        return False  # the caller decides what an interrupt means

    def event(self, ev) -> None:
        kind, text = ev.kind, getattr(ev, "text", "") or ""
        if kind == "reasoning":
            self.reasoning_text += text
            self.reasoning_tokens += 1
        elif kind == "content":
            self.content_text += text
        elif kind == "tool_call":
            self.notes.append(f"tool call {getattr(ev, 'recipient', '?')}({getattr(ev, 'arguments', '')}) "
                              "— this chat has no tools")


    def _view(self):
        final = self.final
        parts = []
        if self.show_reasoning and self.reasoning_text:
            parts.append(Padding(Text(self.reasoning_text.strip(), style="dim italic"), (0, 0, 1, 2)))
        elif not self.content_text and not final:
            n = self.reasoning_tokens
            label = f"thinking… {n} token{'s' if n != 1 else ''}" if n else "thinking…"
            parts.append(Spinner("dots", text=Text(label, style="dim")))
        if self.content_text:
            parts.append(Markdown(self.content_text))
        for note in self.notes:
            parts.append(Text(note, style="yellow"))
        if final and self.interrupted:
            parts.append(Text("[stopped]", style="dim"))
        return Group(*parts)


def stats_line(stats, reasoning_tokens: int = 0) -> str:
    """'123 tokens (45 thinking) · first token 0.31 s · 23.4 tok/s' from the engine's done-event stats."""
    if stats is None:
        return ""
    generated = _get(stats, "generated_tokens", "completion_tokens", "tokens")
    ttft = _get(stats, "time_to_first_token", "ttft", "ttft_s")
    tps = _get(stats, "decode_tps", "decode_tokens_per_second", "generation_tps", "tokens_per_second")
    parts = []
    if generated is not None:
        parts.append(f"{generated} tokens" + (f" ({reasoning_tokens} thinking)" if reasoning_tokens else ""))
    if ttft is not None:
        parts.append(f"first token {ttft:.2f} s")
    if tps is not None:
        parts.append(f"{tps:.1f} tok/s")
    prefilled = _get(stats, "prefilled_tokens", "prefill_tokens")
    prompt = _get(stats, "prompt_tokens")
    if prefilled is not None and prompt is not None:
        parts.append(f"prompt {prompt} tokens ({prefilled} new)")
    return " · ".join(parts)


def _get(obj, *names):
    for n in names:
        v = obj.get(n) if isinstance(obj, dict) else getattr(obj, n, None)
        if v is not None:
            return v
    return None
