"""How one reply looks in the terminal while it streams, and the stats line after it.

TTY: a Rich Live view. The chain-of-thought is hidden behind a "thinking… N tokens" spinner (OpenAI advises
not to show it to end users) or, when shown, streamed dimmed in its own indented block; the answer streams
as Markdown underneath and stays on screen as the final rendering. Text the model wrote outside any message
(malformed output) is shown dimmed after it, whatever the reasoning setting. Not a TTY: nothing but the
final answer, as plain text, once the reply is complete.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console, Group
from rich.padding import Padding
from rich.text import Text


class ReplyView:
    """Feed it the engine's events (kind "reasoning" / "preamble" / "content" / "tool_call" / "done") as they come."""

    def __init__(self, console: Console, *, show_reasoning: bool, plain: bool):
        self.console, self.show_reasoning, self.plain = console, show_reasoning, plain
        self.reasoning_text, self.content_text = "", ""
        self.preamble_text = ""  # what the model tells the user before a tool call: shown dimmed
        self.stray_text = ""  # text the model wrote outside any harmony message (malformed): shown dimmed
        self.reasoning_tokens = 0
        self.tokens = 0  # reasoning and answer pieces seen (one per token): counts an interrupted reply too
        self.started = time.perf_counter()
        self.spinner = None  # one spinner: a new one each refresh would never move
        self.notes: list[str] = []
        self.interrupted = False
        self.live: Live | None = None

    def __enter__(self) -> "ReplyView":
        if not self.plain:
            from rich.live import Live  # here, not at the top: `gptoss-mac --help` never pays for it
            from rich.spinner import Spinner

            self.spinner = Spinner("dots", style="dim")
            # get_renderable: the Markdown is parsed at the refresh rate in Live's thread, not once per token.
            self.live = Live(console=self.console, get_renderable=self._view, refresh_per_second=12,
                             transient=False, vertical_overflow="visible")
            self.live.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is KeyboardInterrupt:
            self.interrupted = True
        if self.live is not None:
            self.live.__exit__(None, None, None)  # its last refresh, once stopped, draws the whole reply
        else:
            if self.content_text and not self.interrupted:
                print(self.content_text.strip(), flush=True)
            for note in self.notes:  # piped: stdout holds only answers
                print(f"note: {note}", file=sys.stderr, flush=True)
        return False  # the caller decides what an interrupt means

    def event(self, ev) -> None:
        kind, text = ev.kind, getattr(ev, "text", "") or ""
        if kind == "reasoning" and getattr(ev, "channel", "analysis") is None:  # outside a message: malformed
            self.stray_text += text
            self.tokens += 1
        elif kind == "reasoning":
            self.reasoning_text += text
            self.reasoning_tokens += 1
            self.tokens += 1
        elif kind == "preamble":
            self.preamble_text += text
            self.tokens += 1
        elif kind == "content":
            self.content_text += text
            self.tokens += 1
        elif kind == "tool_call":
            self.notes.append(f"the model called a tool, {getattr(ev, 'recipient', '?')}"
                              f"({getattr(ev, 'arguments', '')}), but this chat has no tools: the reply ends here")

    def _view(self):
        from rich.markdown import Markdown

        # Live.stop() clears is_started, under the lock its refresh thread takes, before its last refresh: that
        # one refresh draws the whole reply (once), every earlier one only the Tail
        final = self.live is None or not self.live.is_started
        parts = []
        if self.show_reasoning and self.reasoning_text:
            parts.append(Padding(Text(self.reasoning_text.strip(), style="dim italic"), (0, 0, 1, 2)))
        elif not self.content_text and not final:
            n = self.reasoning_tokens
            label = f"thinking… {n} token{'s' if n != 1 else ''}" if n else "thinking…"
            self.spinner.update(text=Text(f"{label} · {time.perf_counter() - self.started:.1f} s", style="dim"))
            parts.append(self.spinner)
        if self.preamble_text:
            parts.append(Text(self.preamble_text.strip(), style="dim"))
        if self.content_text:
            parts.append(Markdown(self.content_text))
        if self.stray_text:
            parts.append(Text(self.stray_text.strip(), style="dim"))
        for note in self.notes:
            parts.append(Text(note, style="yellow"))
        if final and self.interrupted:
            parts.append(Text("[stopped]", style="dim"))
        return Group(*parts) if final else Tail(Group(*parts))


class Tail:
    """While a reply streams, only its last lines that fit the terminal. A live view taller than the screen
    cannot be redrawn in place (its top has scrolled away), so Rich would print those lines again below on
    every refresh; the final rendering, printed once, is whole."""

    def __init__(self, renderable):
        self.renderable = renderable

    def __rich_console__(self, console, options):
        from rich.segment import Segment

        lines = console.render_lines(self.renderable, options, pad=False)
        lines = lines[-max(1, options.size.height - 1):]
        for i, line in enumerate(lines):
            yield from line
            if i + 1 < len(lines):
                yield Segment.line()


def stats_line(stats, reasoning_tokens: int = 0) -> str:
    """'18 tokens (5 thinking) · first token 0.08 s · 19.5 tok/s · prompt 84 tokens (15 new)' from a
    mlx_gptoss.chat.Stats; "new" is what this turn prefilled, the rest came from the session's prompt cache."""
    if stats is None:
        return ""
    thinking = f" ({reasoning_tokens} thinking)" if reasoning_tokens else ""
    return (f"{stats.generated_tokens} tokens{thinking} · first token {stats.time_to_first_token:.2f} s · "
            f"{stats.decode_tps:.1f} tok/s · prompt {stats.prompt_tokens} tokens ({stats.prefilled_tokens} new)")
