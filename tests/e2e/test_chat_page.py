"""The chat page in a real browser (Debian's Chromium through Playwright) against a real
`chatqueue serve` with the mock engine echoing the last message word by word."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Dialog,
    Page,
    Route,
    expect,
    sync_playwright,
)

from tests.support.servers import Server, running_server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 15_000  # a safety net against hangs, never a measurement
expect.set_options(
    timeout=WAIT_MS
)  # `expect` has its own default (5 s), too short on a busy machine


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("chat-page")
    with running_server(
        *("--engine", "mock", "--mock-mode", "echo", "--mock-delay", "0.05"),
        *("--max-concurrent", "1", "--data-dir", str(tmp)),
        tmp_path=tmp,
    ) as s:
        yield s


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed (make test installs it)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def context(browser: Browser, server: Server) -> Iterator[BrowserContext]:
    """A fresh browser profile: its own cookies, so its own chat session."""
    ctx = browser.new_context(base_url=server.url, viewport={"width": 390, "height": 844})
    ctx.set_default_timeout(WAIT_MS)
    yield ctx
    ctx.close()


def open_page(context: BrowserContext) -> Page:
    page = context.new_page()
    page.goto("/")
    expect(page.locator("#send")).to_be_visible()
    wait_ready(page)
    return page


def wait_ready(page: Page) -> None:
    """Until the page shows the conversation as the server has it."""
    expect(page.locator("body")).to_have_attribute("data-ready", "true")


def send(page: Page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def replies(page: Page) -> list[str]:
    return page.locator(".message.assistant .text").all_text_contents()


def last_reply(page: Page) -> str:
    return page.locator(".message.assistant .text").last.text_content() or ""


def wait_for_reply_to_start(page: Page) -> str:
    page.wait_for_function(
        "() => { const t = [...document.querySelectorAll('.message.assistant .text')].pop();"
        " return t && t.textContent.length > 0; }"
    )
    return last_reply(page)


def test_the_page_runs_under_its_content_security_policy(context: BrowserContext) -> None:
    """The page's CSP forbids inline script; the page still works and Chromium reports no
    violation of it."""
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda message: console.append(message.text))
    response = page.goto("/")
    assert response is not None and response.ok
    csp = response.headers["content-security-policy"]
    for directive in (
        "script-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
        "default-src 'self'",
    ):
        assert directive in csp
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    wait_ready(page)
    send(page, "still works")
    expect(page.locator(".message.assistant .text").last).to_have_text("still works")
    assert not [text for text in console if "Content Security Policy" in text], console
    # NOTE: an injected inline script is refused, and that is what a violation looks like: the
    # listener hears Chromium's report, so the empty list above means something.
    with page.expect_console_message(lambda m: "Content Security Policy" in m.text):
        page.evaluate(
            "() => { const s = document.createElement('script');"
            " s.textContent = 'window.injected = true'; document.body.append(s); }"
        )
    assert page.evaluate("window.injected") is None


def test_a_reply_streams_in_at_phone_width(context: BrowserContext) -> None:
    page = open_page(context)
    words = " ".join(f"word{i}" for i in range(100))  # 5 s of reply: a part is seen first
    send(page, words)
    partial = wait_for_reply_to_start(page)
    assert words.startswith(partial) and len(partial) < len(words)  # a part before the whole
    expect(page.locator("#stop")).to_be_visible()
    expect(page.locator(".message.assistant .text").last).to_have_text(words)
    expect(page.locator("#send")).to_be_visible()
    expect(page.locator(".message.user .text")).to_have_text([words])
    box = page.locator("#send").bounding_box()
    assert box is not None and box["x"] + box["width"] <= 390  # nothing off-screen on a phone

    page.get_by_role("button", name="Good reply").click()
    expect(page.get_by_role("button", name="Good reply")).to_have_attribute("aria-pressed", "true")
    page.get_by_role("button", name="Regenerate this reply").click()
    expect(page.locator(".message.assistant")).to_have_count(1)
    expect(page.locator(".message.assistant .text")).to_have_text(words)


def test_a_second_user_sees_its_place_in_line_then_its_answer(
    browser: Browser, server: Server, context: BrowserContext
) -> None:
    first = open_page(context)
    # NOTE: 25 s of reply unless stopped, and stopped once the second user is seen in line: the
    # second request waits whatever the machine's speed.
    send(first, " ".join(f"long{i}" for i in range(600)))
    wait_for_reply_to_start(first)  # the only processing slot is taken

    other = browser.new_context(base_url=server.url)
    other.set_default_timeout(WAIT_MS)
    try:
        second = open_page(other)
        send(second, "second in line")
        expect(second.locator(".message.assistant .note")).to_contain_text(
            re.compile(r"position 1(, about \d+ s)?")
        )
        first.click("#stop")
        expect(second.locator(".message.assistant .text")).to_have_text("second in line")
        expect(second.locator(".message.assistant .note")).to_have_text("")
    finally:
        other.close()


def test_the_page_works_through_several_api_servers(browser: Browser, tmp_path: Path) -> None:
    """`--api-servers 2`: the page's requests reach either process (new connections, a reload);
    its session, its conversation and the line it waits in are the one server's."""
    args = ("--engine", "mock", "--mock-mode", "echo", "--mock-delay", "0.05")
    with running_server(
        *args, "--max-concurrent", "1", "--api-servers", "2", "--data-dir", str(tmp_path),
        tmp_path=tmp_path,
    ) as split:  # fmt: skip
        contexts = [browser.new_context(base_url=split.url) for _ in range(2)]
        try:
            for ctx in contexts:
                ctx.set_default_timeout(WAIT_MS)
            first, second = (open_page(ctx) for ctx in contexts)
            send(first, " ".join(f"long{i}" for i in range(600)))
            wait_for_reply_to_start(first)  # the only processing slot is taken
            send(second, "second in line")
            expect(second.locator(".message.assistant .note")).to_contain_text(
                re.compile(r"position 1(, about \d+ s)?")
            )
            first.click("#stop")
            expect(second.locator(".message.assistant .text")).to_have_text("second in line")
            expect(second.locator("#send")).to_be_visible()  # `done`: the reply is stored
            for _ in range(3):  # each reload a new connection: either API server answers
                second.reload()
                wait_ready(second)
                expect(second.locator(".message .text")).to_have_text(["second in line"] * 2)
        finally:
            for ctx in contexts:
                ctx.close()


def test_stop_aborts_the_generation_and_keeps_what_came(
    context: BrowserContext, server: Server
) -> None:
    page = open_page(context)
    words = [f"w{i}" for i in range(400)]  # 20 s of reply if nothing stopped it
    send(page, " ".join(words))
    wait_for_reply_to_start(page)
    page.click("#stop")
    expect(page.locator(".message.assistant").last).to_have_class(re.compile("interrupted"))
    assert server.wait_idle()["processing"] == 0  # the server aborted it, not just the page

    page.reload()
    reply = page.locator(".message.assistant").last
    expect(reply).to_have_class(re.compile("interrupted"))
    kept = (reply.locator(".text").text_content() or "").split()
    assert kept and kept == words[: len(kept)] and len(kept) < len(words)


def test_reload_keeps_the_conversation(context: BrowserContext) -> None:
    page = open_page(context)
    send(page, "keep this one")
    expect(page.locator(".message.assistant .text")).to_have_text("keep this one")
    expect(page.locator("#send")).to_be_visible()
    page.reload()
    expect(page.locator(".message .text")).to_have_text(["keep this one", "keep this one"])

    page.click("#new-chat")
    expect(page.locator(".message")).to_have_count(0)
    page.reload()
    expect(page.locator("#send")).to_be_visible()
    wait_ready(page)  # else no message could just mean no history yet
    expect(page.locator(".message")).to_have_count(0)


def test_a_message_sent_before_the_history_arrives_is_kept(context: BrowserContext) -> None:
    page = context.new_page()
    # the history's request, held until the message is sent. NOTE: the handler only keeps it: a
    # fetch in the handler kept it from the list until the server had answered, which on a busy
    # machine came after the assertion below
    held: list[Route] = []
    page.route("**/chat/history", lambda route: held.append(route))
    page.goto("/")
    send(page, "sent early")
    expect(page.locator("#input")).to_have_value("")
    expect(page.locator("#stop")).to_be_visible()
    assert len(held) == 1
    route = held[0]
    route.fulfill(response=route.fetch())  # the empty history, answered now
    expect(page.locator(".message.assistant .text")).to_have_text("sent early")
    expect(page.locator(".message.user .text")).to_have_text(["sent early"])


def test_model_output_is_text_never_markup(context: BrowserContext) -> None:
    page = open_page(context)
    dialogs: list[str] = []

    def on_dialog(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    attack = "<img src=x onerror=alert(1)>"
    send(page, attack)
    expect(page.locator(".message.assistant .text")).to_have_text(attack)
    expect(page.locator("#send")).to_be_visible()
    page.reload()  # the history is rendered by another path
    expect(page.locator(".message.assistant .text")).to_have_text(attack)
    assert page.locator("img").count() == 0
    assert dialogs == []


def test_a_full_server_gets_a_clear_message_and_an_automatic_retry(
    context: BrowserContext,
) -> None:
    page = open_page(context)
    refused: list[str] = []

    def first_time_full(route: Route) -> None:
        if not refused:
            refused.append(route.request.url)
            route.fulfill(
                status=429,
                headers={"Retry-After": "1", "Content-Type": "application/json"},
                body='{"error": {"message": "full", "type": "queue_full"}}',
            )
        else:
            route.continue_()

    page.route("**/chat", first_time_full)
    send(page, "try again please")
    expect(page.locator(".message.assistant .note")).to_contain_text("busy")
    expect(page.locator(".message.assistant .text")).to_have_text("try again please")
    assert len(refused) == 1


def test_on_a_server_with_an_api_key_the_page_asks_for_it_then_works(
    browser: Browser, tmp_path: Path
) -> None:
    args = ("--engine", "mock", "--mock-delay", "0.01", "--api-key", "page-secret")
    with running_server(*args, "--data-dir", str(tmp_path), tmp_path=tmp_path) as keyed:
        ctx = browser.new_context(base_url=keyed.url)
        ctx.set_default_timeout(WAIT_MS)
        page = open_page(ctx)
        expect(page.locator("#status")).to_contain_text("needs an API key")
        send(page, "no key yet")  # refused: the reply bubble says why
        expect(page.locator(".message.assistant").last).to_contain_text("needs an API key")

        # The parameters, fetched again with the key, answer only once the reply is in: sending
        # must not wait for them.
        held: list[Route] = []
        page.route(
            "**/chat/params",
            lambda route: (
                held.append(route)
                if route.request.headers.get("authorization")
                else route.continue_()
            ),
        )
        page.locator("#settings summary").click()
        page.fill("#key-form input[name=key]", "page-secret")
        page.locator("#key-form button").click()
        expect(page.locator("#status")).to_contain_text("API key saved")
        send(page, "now with the key")
        expect(page.locator(".message.assistant .text").last).to_have_text("now with the key")
        assert len(held) == 1
        held[0].continue_()
        expect(page.locator("#params-form input[name=max_tokens]")).to_have_attribute(
            "placeholder", re.compile(r"default \d+")
        )
        ctx.close()


def test_delete_asks_first_then_removes_the_conversation(context: BrowserContext) -> None:
    page = open_page(context)
    send(page, "delete me")
    expect(page.locator(".message.assistant .text")).to_have_text("delete me")
    expect(page.locator("#send")).to_be_visible()

    asked: list[str] = []

    def answer(accept: bool) -> Callable[[Dialog], None]:
        def on_dialog(dialog: Dialog) -> None:
            asked.append(dialog.message)
            dialog.accept() if accept else dialog.dismiss()

        return on_dialog

    page.once("dialog", answer(False))
    page.click("#delete-chat")
    expect(page.locator(".message")).to_have_count(2)  # dismissed: nothing deleted
    page.once("dialog", answer(True))
    page.click("#delete-chat")
    expect(page.locator(".message")).to_have_count(0)
    expect(page.locator("#status")).to_have_text("Conversation deleted.")
    assert len(asked) == 2 and "Delete this conversation?" in asked[0]
    page.reload()
    expect(page.locator("#send")).to_be_visible()
    wait_ready(page)
    expect(page.locator(".message")).to_have_count(0)


# The page's look and its replies: icons, actions, the wait, Markdown, themes (issue 16, item 6).

ACTIONS = ("Good reply", "Bad reply", "Copy this reply", "Regenerate this reply")
MARKDOWN_REPLY = (
    "Here is how:\n\n```\nprint(1)\n```\n\n- one\n- two\n\n1. first\n2. second\n\n"
    "Use `x` and [the docs](https://example.com/docs)."
)


def watch_console(page: Page) -> list[str]:
    """Every console error and CSP report the page gives from now on."""
    seen: list[str] = []
    page.on(
        "console",
        lambda m: (
            seen.append(m.text)
            if m.type == "error" or "Content Security Policy" in m.text
            else None
        ),
    )
    page.on("pageerror", lambda e: seen.append(str(e)))
    return seen


def wait_done(page: Page) -> None:
    expect(page.locator("#send")).to_be_visible()
    expect(page.locator(".message.assistant").last.locator(".actions")).to_have_count(1)


def test_the_icons_are_svg_with_names(context: BrowserContext) -> None:
    page = open_page(context)
    send(page, "icons please")
    wait_done(page)
    for name in (*ACTIONS, "Delete this conversation"):
        btn = page.get_by_role("button", name=name)
        expect(btn).to_have_count(1)
        svg = btn.locator("svg")
        expect(svg).to_have_count(1)
        box = svg.bounding_box()
        assert box is not None and box["width"] >= 12 and box["height"] >= 12
    # No emoji, or any other character that needs a font the machine may lack, in a button.
    labels = page.locator(".actions button").all_text_contents()
    assert labels == ["", "", "", ""]


def test_actions_only_on_a_finished_reply(
    browser: Browser, server: Server, context: BrowserContext
) -> None:
    first = open_page(context)
    # NOTE: a reply of 512 tokens (the default cap) at 0.05 s a step, stopped by the test once its
    # checks are done: the checks never race the reply's end, however slow the machine.
    send(first, " ".join(f"long{i}" for i in range(600)))
    wait_for_reply_to_start(first)  # the only slot is taken: this reply streams
    streaming = first.locator(".message.assistant").last
    assert first.evaluate(
        "() => { const m = [...document.querySelectorAll('.message.assistant')].pop();"
        " return document.querySelector('#stop').hidden === false"
        " && m.querySelectorAll('button').length === 0; }"
    )
    other = browser.new_context(base_url=server.url)
    other.set_default_timeout(WAIT_MS)
    try:
        second = open_page(other)
        # Every change of the page while its reply waits in line: how many buttons it had then.
        second.evaluate(
            "() => { window.queuedButtons = [];"
            " new MutationObserver(() => {"
            "   const m = [...document.querySelectorAll('.message.assistant')].pop();"
            "   const note = m && m.querySelector('.note');"
            "   if (note && note.textContent.includes('position'))"
            "     window.queuedButtons.push(m.querySelectorAll('button').length);"
            " }).observe(document.body, {subtree: true, childList: true, characterData: true}); }"
        )
        send(second, "waiting for my turn")
        queued = second.locator(".message.assistant").last
        expect(queued.locator(".note")).to_contain_text("position 1")
        assert second.evaluate("() => window.queuedButtons.every((n) => n === 0)")
        first.click("#stop")
        wait_done(first)
        for name in ACTIONS:
            expect(streaming.get_by_role("button", name=name)).to_be_visible()
        expect(queued.locator(".text")).to_have_text("waiting for my turn")
        wait_done(second)
        for name in ACTIONS:
            expect(queued.get_by_role("button", name=name)).to_be_visible()
    finally:
        other.close()


def test_the_time_waited_shows_and_grows_while_no_eta_is_known(
    browser: Browser, tmp_path: Path
) -> None:
    """A fresh server has seen no completion, so it knows no ETA: the page counts the wait."""
    args = ("--engine", "mock", "--mock-delay", "0.05", "--max-concurrent", "1")
    with running_server(*args, "--data-dir", str(tmp_path), tmp_path=tmp_path) as fresh:
        ctx = browser.new_context(base_url=fresh.url)
        ctx.set_default_timeout(WAIT_MS)
        other = browser.new_context(base_url=fresh.url)
        other.set_default_timeout(WAIT_MS)
        try:
            first = open_page(ctx)
            send(first, " ".join(f"w{i}" for i in range(400)))  # 20 s unless stopped
            wait_for_reply_to_start(first)
            second = open_page(other)
            send(second, "me next")
            note = second.locator(".message.assistant .note")
            waited = re.compile(r"position 1 · waited (\d+) s")
            expect(note).to_have_text(waited)
            assert "left" not in (note.text_content() or "")  # no ETA was known
            start = int(waited.search(note.text_content() or "").group(1))  # type: ignore[union-attr]
            for later in (start + 1, start + 2):  # it grows, second by second
                second.wait_for_function(
                    "(n) => { const t = document.querySelector('.message.assistant .note')"
                    ".textContent; const m = t.match(/position 1 · waited (\\d+) s$/);"
                    " return m && Number(m[1]) >= n; }",
                    arg=later,
                )
            expect(second.locator("#status")).to_have_text(re.compile(r"position 1 · waited \d+ s"))
            first.click("#stop")
            expect(second.locator(".message.assistant .text")).to_have_text("me next")
            expect(note).to_have_text("")
            expect(second.locator("#status")).to_have_text("")
        finally:
            other.close()
            ctx.close()


def test_replies_render_as_markdown(context: BrowserContext) -> None:
    page = open_page(context)
    problems = watch_console(page)
    send(page, MARKDOWN_REPLY)
    wait_done(page)
    for _ in range(2):  # as streamed, then as the history shows it after a reload
        reply = page.locator(".message.assistant .text").last
        expect(reply.locator("pre > code")).to_have_text("print(1)")
        expect(reply.locator("ul > li")).to_have_text(["one", "two"])
        expect(reply.locator("ol > li")).to_have_text(["first", "second"])
        expect(reply.locator("p > code")).to_have_text("x")
        link = reply.locator("a")
        expect(link).to_have_text("the docs")
        expect(link).to_have_attribute("href", "https://example.com/docs")
        expect(link).to_have_attribute("rel", "noopener noreferrer")
        # The user's own message stays as typed.
        expect(page.locator(".message.user .text").last).to_have_text(MARKDOWN_REPLY)
        page.reload()
        wait_ready(page)
    assert problems == []


def test_an_open_code_block_renders_while_it_streams(context: BrowserContext) -> None:
    page = open_page(context)
    problems = watch_console(page)
    send(page, "```\n" + "\n".join(f"line{i}" for i in range(300)) + "\n```")
    # Still streaming (Stop shown) and the unclosed fence is already a code block.
    page.wait_for_function(
        "() => { const m = [...document.querySelectorAll('.message.assistant')].pop();"
        " const code = m && m.querySelector('pre > code');"
        " return !document.querySelector('#stop').hidden && code"
        " && code.textContent.startsWith('line0\\nline1'); }"
    )
    page.click("#stop")
    expect(page.locator(".message.assistant").last).to_have_class(re.compile("interrupted"))
    assert problems == []


def test_every_prefix_of_a_reply_renders(context: BrowserContext) -> None:
    """A streaming reply is rendered at every token: any cut of Markdown must render, into
    Markdown's elements only."""
    page = open_page(context)
    text = MARKDOWN_REPLY + "\n\n| a | b |\n|:-|-:|\n| 1 | 2 |\n\n> quoted **bold** _it_\n\n***"
    tags = page.evaluate(
        """(text) => {
            const seen = new Set();
            for (let i = 0; i <= text.length; i++) {
                const div = document.createElement('div');
                div.append(markdown.render(text.slice(0, i)));
                for (const el of div.querySelectorAll('*')) seen.add(el.tagName.toLowerCase());
            }
            return [...seen].sort();
        }""",
        text,
    )
    allowed = {"p", "br", "hr", "strong", "em", "del", "code", "pre", "blockquote", "ul", "ol"}
    allowed |= {"li", "a", "table", "thead", "tbody", "tr", "th", "td", "h1", "h2"}
    assert {"pre", "code", "ul", "ol", "table", "blockquote", "strong", "a"} <= set(tags)
    assert set(tags) <= allowed, tags


def test_markdown_attacks_neither_run_nor_survive(context: BrowserContext) -> None:
    page = open_page(context)
    problems = watch_console(page)
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    attack = (
        '[click me](javascript:alert(1)) and <a href="javascript:alert(2)">raw</a>\n\n'
        '<img src=x onerror="window.pwned=1"> <script>window.pwned=2</script>\n\n'
        "![pic](x onerror=alert(3)) <svg onload=alert(4)></svg> [data](data:text/html,hi)"
    )
    send(page, attack)
    wait_done(page)
    for _ in range(2):  # as streamed, then from the history
        reply = page.locator(".message.assistant .text").last
        expect(reply.locator("a", has_text="click me")).to_have_count(1)
        assert reply.locator("img, script, svg, iframe, [onerror], [onload]").count() == 0
        hrefs = reply.locator("a").evaluate_all("els => els.map(a => a.getAttribute('href'))")
        assert all(h is None or h.startswith(("http:", "https:", "mailto:")) for h in hrefs)
        expect(reply).to_contain_text('<img src=x onerror="window.pwned=1">')  # shown as text
        reply.locator("a", has_text="click me").click()
        page.reload()
        wait_ready(page)
    assert page.evaluate("window.pwned") is None
    assert dialogs == []
    assert [p for p in problems if "Content Security Policy" in p] == []


def relative_luminance(css: str) -> float:
    r, g, b = (int(v) / 255 for v in re.findall(r"\d+", css)[:3])
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in (r, g, b)]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def contrast(fg: str, bg: str) -> float:
    hi, lo = sorted((relative_luminance(fg), relative_luminance(bg)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


COLOURS = """() => {
    const c = (sel, prop) => getComputedStyle(document.querySelector(sel))[prop];
    return {
        body: [c('body', 'color'), c('body', 'backgroundColor')],
        reply: [c('.message.assistant .text', 'color'), c('.message.assistant', 'backgroundColor')],
        user: [c('.message.user .text', 'color'), c('.message.user', 'backgroundColor')],
        code: [c('.message.assistant pre code', 'color'), c('.message.assistant pre', 'backgroundColor')],
        link: [c('.message.assistant a', 'color'), c('.message.assistant', 'backgroundColor')],
        button: [c('#new-chat', 'color'), c('#new-chat', 'backgroundColor')],
        action: [c('.actions button', 'color'), c('.actions button', 'backgroundColor')],
        status: [c('#status', 'color'), c('body', 'backgroundColor')],
    };
}"""


def test_the_theme_follows_the_system_and_stays_readable(context: BrowserContext) -> None:
    page = open_page(context)
    send(page, MARKDOWN_REPLY)
    wait_done(page)
    for scheme in ("light", "dark"):
        page.emulate_media(color_scheme=scheme)  # type: ignore[arg-type]
        colours = page.evaluate(COLOURS)
        body_fg, body_bg = colours["body"]
        if scheme == "dark":
            assert relative_luminance(body_bg) < 0.05 < 0.6 < relative_luminance(body_fg)
        else:
            assert relative_luminance(body_bg) > 0.8 > 0.05 > relative_luminance(body_fg)
        for part, (fg, bg) in colours.items():
            assert contrast(fg, bg) >= 4.5, (scheme, part, fg, bg)


def test_screenshots_for_people_to_look_at(context: BrowserContext, tmp_path: Path) -> None:
    """Not asserted: phone and desktop, light and dark, for a person to look at."""
    page = open_page(context)
    send(page, "Show me a list and some code.")
    wait_done(page)
    send(page, MARKDOWN_REPLY)
    wait_done(page)
    # Regenerate is offered on the last reply only (it replaces that one).
    expect(page.get_by_role("button", name="Regenerate this reply")).to_have_count(1)
    expect(page.get_by_role("button", name="Good reply")).to_have_count(2)
    for width, height in ((390, 844), (1280, 800)):
        page.set_viewport_size({"width": width, "height": height})
        for scheme in ("light", "dark"):
            page.emulate_media(color_scheme=scheme)  # type: ignore[arg-type]
            page.screenshot(path=tmp_path / f"chat-{width}x{height}-{scheme}.png", full_page=True)
    print(f"screenshots: {tmp_path}")
    assert len(list(tmp_path.glob("chat-*.png"))) == 4
