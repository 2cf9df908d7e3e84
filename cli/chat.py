"""`gptoss-mac chat`: a terminal chat with gpt-oss.

Interactive (a TTY): prompt_toolkit line editing and history, multi-line input (Esc then Enter, or end a
line with a backslash), the reply streamed by render.ReplyView, slash commands, Ctrl-C stops a reply and
keeps the conversation, Ctrl-D or /exit quits. Piped: one prompt per input line, only the final answers
on stdout, no colours. The conversation is autosaved as JSON after every reply and on a crash.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from mlx_gptoss import hub
from mlx_gptoss.errors import GptOssError

from . import download as dl, options, saved
from .render import ReplyView, stats_line

EFFORTS = saved.EFFORTS
err = Console(stderr=True, highlight=False)


def error(text: str) -> None:
    """One red line on stderr, never wrapped; text is printed as it is (no Rich markup)."""
    err.print(f"[bold red]error:[/] {escape(text)}", soft_wrap=True)


def state_dir() -> Path:
    """Where history and autosaves live: $XDG_STATE_HOME/gptoss-mac, else ~/.local/state/gptoss-mac."""
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "gptoss-mac"


# --- option checks: one sentence each, exit status 2 (click's usage error) -------------------------------

def _temperature(value: float) -> float:
    if not math.isfinite(value) or value < 0:
        raise typer.BadParameter(f"must be 0 (greedy) or a finite number above it, like 1.0; got {value}")
    return value


def _top_p(value: float) -> float:
    if not math.isfinite(value) or not 0 < value <= 1:
        raise typer.BadParameter(f"must be in (0, 1], like 0.9; got {value}")
    return value


MAX_SEED = 2**64 - 1  # MLX's random seed is an unsigned 64-bit integer


def _seed(value: int | None) -> int | None:
    if value is not None and not 0 <= value <= MAX_SEED:
        raise typer.BadParameter(f"must be a whole number from 0 to {MAX_SEED}; got {value}")
    return value


@dataclass
class Settings:
    effort: str = "medium"
    show_reasoning: bool = False
    developer: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = None
    seed: int | None = None


@dataclass
class Totals:
    turns: int = 0
    tokens: int = 0
    seconds: float = 0.0
    last: object = None


def chat(
    model: str = typer.Option(hub.DEFAULT_MODEL, "--model", "-m",
                              help="Hugging Face repo id or local folder; a repo is downloaded on first use."),
    effort: str = typer.Option("medium", "--effort", callback=options.choice(*EFFORTS),
                               help="Reasoning effort: low, medium or high."),
    show_reasoning: bool = typer.Option(False, "--show-reasoning", help="Stream the chain-of-thought (dimmed)."),
    temperature: float = typer.Option(1.0, "--temperature", callback=_temperature,
                                      help="Sampling temperature; 0 is greedy. OpenAI recommends 1.0."),
    top_p: float = typer.Option(1.0, "--top-p", callback=_top_p, help="Nucleus sampling threshold."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", callback=options.positive("2048"),
                                          help="Most tokens per reply (reasoning included)."),
    ctx: int | None = typer.Option(None, "--ctx", callback=options.positive("8192"),
                                   help="Context length in tokens (default: what fits in memory)."),
    developer: str | None = typer.Option(None, "--developer", help="Developer instructions (system prompt)."),
    seed: int | None = typer.Option(None, "--seed", callback=_seed, help="Random seed, for reproducible sampling."),
    memory: str | None = typer.Option(None, "--memory", callback=options.memory_size,
                                      help="Memory budget for the plan, like 16GB (default: this machine's)."),
    dtype: str | None = typer.Option(None, "--dtype", callback=options.choice(*options.DTYPES),
                                     help="Activation dtype: bfloat16, float16 or float32 (default: bfloat16 on "
                                     "Metal, float32 on MLX's CPU backend)."),
    offload: str = options.OFFLOAD,
    kv_bits: int | None = options.KV_BITS,
) -> None:
    """Chat with gpt-oss in the terminal (reads one prompt per line when stdin is not a terminal)."""
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    developer = saved.clean(developer)[0] if developer else None  # argv bytes that are not UTF-8
    settings = Settings(effort, show_reasoning, developer, temperature, top_p, max_tokens, seed)
    gpt = load_model(model, ctx=ctx, memory=memory, dtype=dtype, interactive=interactive, offload=offload,
                     kv_bits=kv_bits)
    conv = Conversation(gpt, settings)
    Chat(conv, interactive).run()


# --- the model: download on first use, progress bar, memory plan line ----------------------------------

def load_model(model: str, *, ctx: int | None, memory: str | None, interactive: bool, dtype: str | None = None,
               offload: str = "auto", kv_bits: int | None = None):
    import mlx_gptoss
    from mlx_gptoss.distributed import lead_or_follow

    if not Path(model).expanduser().exists() and not hub.looks_like_path(model) and hub.cached(model) is None:
        plan = hub.plan_download(model)
        if interactive and not typer.confirm(f"{model} is not downloaded yet: fetch {hub.gb(plan.needed)} now?",
                                             default=True, err=True):
            err.print(f"nothing downloaded; `gptoss-mac download {model}` fetches it when you are ready")
            raise typer.Exit(1)
        dl.fetch(plan)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    import mlx.core as mx

    kwargs = {k: v for k, v in (("ctx", ctx), ("memory", memory), ("dtype", dtype and getattr(mx, dtype)),
                                ("kv_bits", kv_bits)) if v is not None}
    kwargs["offload"] = offload
    columns = (TextColumn("loading {task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("layers"),
               TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True, disable=not interactive) as bar:
        task = bar.add_task(model, total=None)
        gpt = mlx_gptoss.load(model, allow_download=False, for_chat=True, group="auto", **kwargs,
                              progress=lambda done, total: bar.update(task, completed=done, total=total))
    gpt = lead_or_follow(gpt)  # under mlx.launch: ranks other than 0 replay rank 0's model calls, then exit
    line = plan_line(gpt)
    err.print(f"[dim]{line}[/]" if interactive else line, markup=interactive, soft_wrap=not interactive)
    return gpt


def plan_line(gpt) -> str:
    """One line: the memory plan load() applied (weights, KV budget, context)."""
    from mlx_gptoss.memory import gb

    plan = gpt.plan

    line = (f"memory plan: {plan.sum_line()} for a context of {plan.context:,} tokens, of "
            f"{gb(plan.budget.usable)} ({plan.budget.source}), {plan.dtype} activations")
    if plan.status == "smaller context":
        line += f"; the context is reduced from {plan.requested_context:,} to fit"
    if hasattr(plan, "lever_notes") and plan.levers.active:
        line += "; levers: " + "; ".join(plan.lever_notes())
    return line


# --- the engine: the only place that talks to the chat Session ------------------------------------------

class Conversation:
    """The chat Session (mlx_gptoss.chat.Session) plus what the CLI adds: settings, JSON files, and the
    messages the session dropped from the model's context to make room (kept here, so a save holds the
    whole conversation and an autosave never shrinks)."""

    def __init__(self, gpt, settings: Settings):
        self.gpt, self.settings = gpt, settings
        self.session = gpt.session(reasoning_effort=settings.effort, developer=settings.developer)
        self.archive: list[dict] = []
        self._before: list[dict] = []

    def send(self, text: str):
        s = self.settings
        self._before = list(self.session.messages)
        # keep_partial: after Ctrl-C the conversation keeps the part of the answer the user already saw
        return self.session.send(text, max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p,
                                 seed=s.seed, keep_partial=True)

    def archive_dropped(self) -> list[dict]:
        """After a turn: keep the oldest messages the session dropped to fit the context; returns them."""
        before, after = self._before, self.session.messages
        n = next(k for k in range(len(before) + 1) if after[:len(before) - k] == before[k:])
        self.archive += before[:n]
        self._before = list(after)
        return before[:n]

    def messages(self) -> list[dict]:
        return self.archive + self.session.messages

    def reset(self) -> None:
        self.session.reset()
        self.archive = []

    def set_effort(self, effort: str) -> None:
        self.settings.effort = effort
        self.session.set_effort(effort)

    def set_developer(self, text: str | None) -> None:
        self.settings.developer = text
        self.session.set_developer(text)

    def save(self, path: Path) -> Path:
        session = {**self.session.to_dict(), "messages": self.messages()}
        return saved.write(path, {"format": saved.FORMAT, "version": saved.VERSION, "model": str(self.gpt.path),
                                  "session": session})

    def load(self, path: Path) -> int:
        """Replace the conversation with a saved one; returns its number of messages. A bad file raises
        GptOssError and leaves the current conversation as it was."""
        data = saved.read(path)
        try:
            session = self.gpt.session(**data)
        except GptOssError as e:
            raise GptOssError(f"{Path(path).expanduser()}: cannot restore this chat: {e}") from None
        self.session, self.archive = session, []
        self.settings.effort = data.get("reasoning_effort", "medium")
        self.settings.developer = data.get("developer")
        return len(session.messages)


def notes(stats, settings: Settings, dropped: list[dict] = (), stray: str = "",
          interactive: bool = True) -> list[str]:
    """What the user should know about a finished reply beyond its text (stray: what the model wrote outside
    any message, which ReplyView shows dimmed on a terminal)."""
    out = []
    if dropped:
        users = [_short(m.get("content")) for m in dropped if m.get("role") == "user"] or ["…"]
        span = f'"{users[0]}"' + (f' to "{users[-1]}"' if len(users) > 1 else "")
        out.append(f"(the context was full: the model no longer sees the {len(users)} oldest turn"
                   f"{'s' if len(users) != 1 else ''} ({len(dropped)} messages, {span}), dropped so that the "
                   "conversation fills at most half of the context; saves still hold them)")
    if stats is None:
        return out
    if stats.stop_reason == "max_tokens":
        out.append(f"(the reply stopped at --max-tokens {settings.max_tokens})")
    elif stats.stop_reason == "context":
        out.append("(the context is full: /reset, or start with a larger --ctx)")
    if stats.malformed:
        why = "; ".join(stats.warnings) or "it did not follow the chat format"
        where = ("" if not stray.strip() else "; what it wrote outside a message is shown dimmed above" if interactive
                 else f"; what it wrote outside a message (not an answer): {stray.strip()!r}")
        out.append(f"(the model's output did not follow the chat format: {why}{where})")
    return out


def _short(text, n: int = 30) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= n else text[:n - 1] + "…"


def _stdin_lines():
    """Piped input, line by line, decoded as UTF-8; undecodable bytes become lone surrogates (surrogateescape)
    for saved.clean() to find and replace."""
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:
        yield from sys.stdin
        return
    for raw in buffer:
        yield raw.decode("utf-8", "surrogateescape")


# --- the loop ------------------------------------------------------------------------------------------

COMMANDS = {
    "/help": "this list",
    "/reset": "start a new conversation",
    "/effort LEVEL": "reasoning effort: low, medium or high",
    "/reasoning on|off": "show or hide the chain-of-thought",
    "/developer TEXT": "set developer instructions (empty: remove them)",
    "/save FILE": "save the conversation as JSON",
    "/load FILE": "load a conversation saved with /save",
    "/stats": "speed and token counts",
    "/exit": "quit (also Ctrl-D)",
}
KEYS = ("Enter sends · Esc then Enter, or a trailing \\, starts a new line · Up/Down: history · "
        "Ctrl-C stops a reply or clears the line · Ctrl-D quits")


class Chat:
    def __init__(self, conv: Conversation, interactive: bool):
        self.conv, self.interactive = conv, interactive
        self.out = Console(highlight=False) if interactive else Console(no_color=True, highlight=False,
                                                                         emoji=False, soft_wrap=True)
        # piped: stdout holds only the answers; everything else (slash commands' output) goes to stderr
        self.info = self.out if interactive else Console(stderr=True, no_color=True, highlight=False, emoji=False,
                                                         soft_wrap=True)
        self.totals = Totals()
        self.autosave_path = state_dir() / "autosave.json"
        self.failed = 0  # prompts that got no reply (piped mode exits 1 if any)
        self.line_no = 0
        self._fresh = True  # the next autosave starts a new conversation: set the old autosave aside first
        self._warned: set[str] = set()

    # -- input
    def _prompt_session(self):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings

        keys = KeyBindings()

        @keys.add("escape", "enter")
        def _newline(event):
            event.current_buffer.insert_text("\n")

        @keys.add("enter")
        def _enter(event):
            buf = event.current_buffer
            if buf.document.text_before_cursor.endswith("\\"):
                buf.delete_before_cursor(1)
                buf.insert_text("\n")
            else:
                buf.validate_and_handle()

        try:
            state_dir().mkdir(parents=True, exist_ok=True)
            history = FileHistory(str(state_dir() / "history"))
        except OSError:
            history = InMemoryHistory()
        return PromptSession(history=history, key_bindings=keys, multiline=True,
                             prompt_continuation=lambda width, *_: "." * (width - 1) + " ")

    def lines(self):
        """User inputs; None on Ctrl-C at the prompt (cleared line)."""
        if not self.interactive:
            for line in _stdin_lines():
                self.line_no += 1
                text, replaced = saved.clean(line)
                if replaced:
                    self._warn_once("utf8", f"input line {self.line_no} is not valid UTF-8: its undecodable bytes "
                                            "are replaced by \ufffd (this is said once)")
                yield text.rstrip("\r\n")
            return
        session = self._prompt_session()
        while True:
            try:
                yield saved.clean(session.prompt("› "))[0]
            except KeyboardInterrupt:
                yield None
            except EOFError:
                return

    def _warn_once(self, key: str, text: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            err.print(f"[yellow]warning:[/] {escape(text)}", soft_wrap=True)

    # -- loop
    def run(self) -> None:
        if self.interactive:
            self.out.print(f"[dim]gpt-oss chat · effort {self.conv.settings.effort} · /help for commands · "
                           "Ctrl-D to quit[/]")
        try:
            for line in self.lines():
                if line is None or not line.strip():
                    continue
                if line.strip().startswith("/"):
                    if self.command(line.strip()) == "exit":
                        break
                    continue
                self.turn(line)
        except typer.Exit:
            raise
        except Exception as e:  # a crash never loses the conversation
            path = state_dir() / f"crash-{time.strftime('%Y%m%d-%H%M%S')}.json"
            error(f"{type(e).__name__}: {e}")
            try:
                where = self.conv.save(path)
                err.print(f"the conversation is saved in {where}; /load it in a new chat to continue", soft_wrap=True)
            except Exception as save_error:
                error(f"the conversation could not be saved: {save_error}")
            raise typer.Exit(1)
        if self.failed and not self.interactive:
            err.print(f"{self.failed} of the prompts got no reply (see above)", soft_wrap=True)
            raise typer.Exit(1)

    def turn(self, text: str) -> None:
        view = ReplyView(self.out, show_reasoning=self.conv.settings.show_reasoning, plain=not self.interactive)
        stats, t0, events = None, time.perf_counter(), None
        try:
            events = self.conv.send(text)
            with view:
                for ev in events:
                    if ev.kind == "done":
                        stats = ev.stats
                    else:
                        view.event(ev)
        except KeyboardInterrupt:
            if events is not None:
                events.close()  # the session restores its cache and keeps the answer so far
            self._count(view, None, t0)
            self.conv.archive_dropped()
            self._autosave()
            if not self.interactive:  # piped: Ctrl-C ends the run, said on stderr (stdout holds only answers)
                err.print(f"stopped; the conversation, with the answer so far, is autosaved in {self.autosave_path}",
                          soft_wrap=True)
                raise typer.Exit(130)
            self.out.print("[dim]stopped; the conversation is kept, with the answer so far.[/]")
            return
        except GptOssError as e:
            if events is not None:
                events.close()
            self.failed += 1
            self.conv.archive_dropped()  # whatever the session let go of to try to fit it stays in the saves
            kept = ("your message is kept in the history: press Up to edit it" if self.interactive
                    else f"input line {self.line_no} was not answered")
            error(f"{e} ({kept})")
            return
        self._count(view, stats, t0)
        for note in notes(stats, self.conv.settings, self.conv.archive_dropped(), view.stray_text, self.interactive):
            err.print(f"[yellow]{escape(note)}[/]", soft_wrap=True)
        if self.interactive:
            line = stats_line(stats, view.reasoning_tokens)
            if line:
                self.out.print(f"[dim]{line}[/]")
        self._autosave()

    def _count(self, view: ReplyView, stats, t0: float) -> None:
        """Add a reply, finished or interrupted, to the /stats totals."""
        self.totals.turns += 1
        self.totals.seconds += time.perf_counter() - t0
        self.totals.tokens += stats.generated_tokens if stats is not None else view.tokens
        if stats is not None:
            self.totals.last = stats

    def _autosave(self) -> None:
        """Save the conversation to autosave.json. A new conversation first moves the previous one's file to
        autosave.previous.json, so starting a chat (or /reset, /load) never overwrites a conversation."""
        try:
            if self._fresh and self.autosave_path.exists():
                self.autosave_path.replace(self.autosave_path.with_name("autosave.previous.json"))
            self._fresh = False
            self.conv.save(self.autosave_path)
        except OSError as e:
            self._warn_once("autosave", f"the conversation cannot be autosaved ({e}); use /save FILE to keep it")

    # -- slash commands
    def command(self, line: str) -> str | None:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        s = self.conv.settings
        say = self.info.print
        if name in ("/exit", "/quit"):
            return "exit"
        if name == "/help":
            for cmd, what in COMMANDS.items():
                say(f"  [bold]{cmd:<18}[/] {what}")
            say(f"[dim]{KEYS}[/]")
            say(f"[dim]every reply is autosaved to {self.autosave_path}[/]")
        elif name == "/reset":
            self.conv.reset()
            self._fresh = True
            say("new conversation.")
        elif name == "/effort":
            if arg not in EFFORTS:
                say(f"usage: /effort low|medium|high (now {s.effort})")
            else:
                self.conv.set_effort(arg)
                say(f"reasoning effort: {arg}")
        elif name == "/reasoning":
            if arg not in ("on", "off"):
                say(f"usage: /reasoning on|off (now {'on' if s.show_reasoning else 'off'})")
            else:
                s.show_reasoning = arg == "on"
                say(f"chain-of-thought {'shown' if s.show_reasoning else 'hidden'}.")
        elif name == "/developer":
            self.conv.set_developer(saved.clean(arg)[0] or None)
            say("developer instructions " + ("set." if arg else "removed."))
        elif name in ("/save", "/load"):
            if not arg:
                say(f"usage: {name} FILE")
            elif name == "/save":
                try:
                    say(f"saved to {self.conv.save(Path(arg))}")
                except OSError as e:
                    error(f"/save {arg}: {e}")
            else:
                try:
                    say(f"loaded {self.conv.load(Path(arg))} messages from {arg}")
                    self._fresh = True
                except GptOssError as e:
                    error(f"/load: {e} (the current conversation is kept)")
        elif name == "/stats":
            self.stats()
        else:
            say(f"unknown command {name}; commands: {' '.join(c.split()[0] for c in COMMANDS)}")
        return None

    def stats(self) -> None:
        t = self.totals
        say = self.info.print
        say(f"{t.turns} replies, {t.tokens} tokens generated in {t.seconds:.1f} s; "
            f"{len(self.conv.messages())} messages in the conversation")
        if t.last is not None:
            say(f"last reply: {stats_line(t.last)}")
        s = self.conv.settings
        say(f"effort {s.effort} · temperature {s.temperature} · top-p {s.top_p} · "
            f"max tokens {s.max_tokens or 'auto'} · seed {s.seed if s.seed is not None else 'random'}")
