"""The chat page in a real browser (Debian's Chromium through Playwright) against a real
`chatqueue serve` with the mock engine echoing the last message word by word."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import (
    APIResponse,
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
    words = " ".join(f"word{i}" for i in range(40))
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
    send(first, " ".join(f"long{i}" for i in range(60)))
    wait_for_reply_to_start(first)  # the only processing slot is taken

    other = browser.new_context(base_url=server.url)
    other.set_default_timeout(WAIT_MS)
    try:
        second = open_page(other)
        send(second, "second in line")
        expect(second.locator(".message.assistant .note")).to_contain_text(
            re.compile(r"position 1(, about \d+ s)?")
        )
        expect(second.locator(".message.assistant .text")).to_have_text("second in line")
        expect(second.locator(".message.assistant .note")).to_have_text("")
    finally:
        other.close()


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
    held: list[tuple[Route, APIResponse]] = []  # the empty history, answered once sent
    page.route("**/chat/history", lambda route: held.append((route, route.fetch())))
    page.goto("/")
    send(page, "sent early")
    expect(page.locator("#input")).to_have_value("")
    expect(page.locator("#stop")).to_be_visible()
    assert len(held) == 1
    route, empty_history = held[0]
    route.fulfill(response=empty_history)
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
