// The chat page: POST /chat, read its SSE stream with fetch + ReadableStream, render replies as
// sanitized Markdown (markdown.js) and everything else as text (textContent, never innerHTML).
"use strict";

const $ = (id) => document.getElementById(id);
const messagesEl = $("messages");
const statusEl = $("status");
const input = $("input");
const sendBtn = $("send");
const stopBtn = $("stop");

let controller = null; // the AbortController of the reply in flight (or of its 429 wait)

function setStatus(text) {
  statusEl.textContent = text;
}

function setBusy(busy) {
  sendBtn.disabled = busy;
  stopBtn.hidden = !busy;
  sendBtn.hidden = busy;
}

function scrollDown() {
  window.scrollTo(0, document.body.scrollHeight);
}

// One message on the page. A user's message is shown as typed (text only); an assistant's reply
// is rendered as Markdown (markdown.js: sanitized), at most once a frame while it streams. Its
// actions (feedback, copy, regenerate) come only once it has ended and is stored: never on a
// reply still waiting in line or streaming.
function addMessage(role, text, { messageId = null, interrupted = false } = {}) {
  const el = document.createElement("div");
  el.className = `message ${role}`;
  const body = document.createElement("div");
  body.className = role === "assistant" ? "text markdown" : "text";
  const note = document.createElement("div");
  note.className = "note";
  el.append(body, note);
  let raw = text;
  let frame = 0;
  const render = () => {
    frame = 0;
    if (role === "assistant") body.replaceChildren(markdown.render(raw));
    else body.textContent = raw;
  };
  const msg = {
    el,
    append(t) {
      raw += t;
      if (!frame) frame = requestAnimationFrame(() => { render(); scrollDown(); });
    },
    note(t) { note.textContent = t; },
    setId(id) { if (id) el.dataset.messageId = id; },
    interrupted() { el.classList.add("interrupted"); },
    failed(t) { el.classList.add("error"); note.textContent = t; },
    // The reply has ended: render what came (a pending frame would be late) and offer its actions.
    finish() {
      if (frame) cancelAnimationFrame(frame);
      render();
      if (el.dataset.messageId && !el.querySelector(".actions")) el.append(actions(el, () => raw));
    },
  };
  render();
  msg.setId(messageId);
  if (interrupted) msg.interrupted();
  if (role === "assistant" && messageId) msg.finish();
  messagesEl.append(el);
  scrollDown();
  return msg;
}

function actions(el, text) {
  const row = document.createElement("div");
  row.className = "actions";
  const up = button("thumbsUp", "Good reply", () => feedback(el, true, up, down));
  const down = button("thumbsDown", "Bad reply", () => feedback(el, false, down, up));
  const copy = button("copy", "Copy this reply", () => copyReply(copy, text()));
  const again = button("regenerate", "Regenerate this reply", regenerate);
  again.classList.add("regenerate");
  row.append(up, down, copy, again);
  return row;
}

function button(iconName, label, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = "icon";
  b.title = label;
  b.setAttribute("aria-label", label);
  b.append(icon(iconName));
  b.addEventListener("click", onClick);
  return b;
}

async function copyReply(btn, text) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    setStatus("The browser did not allow copying.");
    return;
  }
  btn.replaceChildren(icon("check"));
  btn.dataset.copied = "true";
  setTimeout(() => {
    btn.replaceChildren(icon("copy"));
    delete btn.dataset.copied;
  }, 1500);
}

async function feedback(el, like, pressed, other) {
  if (!el.dataset.messageId) return;
  const res = await api("/chat/feedback", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ message_id: el.dataset.messageId, like }),
  });
  if (res.ok) {
    pressed.setAttribute("aria-pressed", "true");
    other.setAttribute("aria-pressed", "false");
  } else {
    setStatus(await errorText(res));
  }
}

// Every call to the server: with the API key, when one is set (servers started with --api-key).
const KEY_ITEM = "chatqueue-api-key";

function api(url, options = {}) {
  const key = localStorage.getItem(KEY_ITEM);
  const headers = { ...(options.headers || {}) };
  if (key) headers.Authorization = `Bearer ${key}`;
  return fetch(url, { ...options, headers });
}

$("key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = event.target.elements.key.value.trim();
  if (key) localStorage.setItem(KEY_ITEM, key);
  else localStorage.removeItem(KEY_ITEM);
  event.target.elements.key.value = "";
  if (await showHistory()) setStatus(key ? "API key saved in this browser." : "API key removed.");
  await loadParams();
});

async function errorText(res) {
  if (res.status === 401) {
    return "This server needs an API key: enter it under Settings.";
  }
  try {
    const body = await res.json();
    return body.error.message;
  } catch {
    return `The server answered ${res.status}.`;
  }
}

// Calls onEvent(name, data) for each SSE event of a fetch response body.
async function readEvents(body, onEvent) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) onEvent(name, JSON.parse(data.join("\n")));
    }
  }
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(timer);
      reject(new DOMException("Aborted", "AbortError"));
    });
  });
}

function seconds(s) {
  const whole = Math.max(0, Math.floor(s));
  return whole < 60 ? `${whole} s` : `${Math.floor(whole / 60)} min ${whole % 60} s`;
}

// Where a reply waiting in line stands, redrawn every second between the server's `queued`
// events: its position, the time waited so far and, once the server knows the drain rate, about
// how long is left (counted down from the latest event, never below 1 s).
function waitingLine(show) {
  const since = performance.now();
  let position = null;
  let eta = null; // [seconds left, when that was said]
  let timer = null;
  const draw = () => {
    const now = performance.now();
    const parts = [`Waiting in line: position ${position}`];
    if (eta) parts.push(`about ${Math.max(1, Math.round(eta[0] - (now - eta[1]) / 1000))} s left`);
    parts.push(`waited ${seconds((now - since) / 1000)}`);
    show(parts.join(" · "));
  };
  return {
    update(pos, etaS) {
      position = pos;
      eta = etaS == null ? null : [etaS, performance.now()];
      draw();
      if (!timer) timer = setInterval(draw, 1000);
    },
    stop() {
      clearInterval(timer);
      timer = null;
    },
  };
}

// Ask for a reply and stream it into a new assistant message. On 429 wait Retry-After and retry.
// `prepare` changes the page for this request once it shows the server's conversation.
async function ask(request, prepare) {
  if (controller) return;
  controller = new AbortController();
  const signal = controller.signal;
  setBusy(true);
  let reply = null;
  let isDone = false;
  let waiting = null;
  try {
    // NOTE: showing the history replaces every message on the page, so a request made while it is
    // fetched (at start, after a key change) waits for it; else its messages would be wiped.
    await historyShown();
    if (signal.aborted) return; // Stop or New chat before it was sent
    prepare();
    reply = addMessage("assistant", "");
    let res;
    for (;;) {
      res = await api("/chat", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(request),
        signal,
      });
      if (res.status !== 429) break;
      const waitS = Math.max(1, parseInt(res.headers.get("Retry-After") || "2", 10) || 2);
      for (let left = waitS; left > 0; left--) {
        reply.note(`The server is busy. Retrying in ${left} s…`);
        setStatus("The server is full right now; your message will be sent automatically.");
        await sleep(1000, signal);
      }
    }
    if (!res.ok) {
      reply.failed(await errorText(res));
      setStatus("");
      return;
    }
    reply.setId(res.headers.get("X-Message-Id"));
    reply.note("");
    setStatus("");
    waiting = waitingLine((text) => {
      reply.note(text);
      setStatus(text);
    });
    await readEvents(res.body, (name, data) => {
      if (name === "queued") {
        waiting.update(data.position, data.eta_s);
      } else if (name === "token") {
        waiting.stop();
        reply.note("");
        setStatus("");
        reply.append(data.text);
      } else if (name === "done") {
        isDone = true;
        waiting.stop();
        reply.setId(data.message_id);
        const notes = [];
        if (data.finish_reason === "length") notes.push("Reply cut at max tokens.");
        if (data.dropped_turns > 0) {
          notes.push(`${data.dropped_turns} earlier exchange(s) no longer fit the model's context and were left out.`);
        }
        reply.note(notes.join(" "));
      } else if (name === "error") {
        isDone = true;
        waiting.stop();
        reply.interrupted();
        reply.failed(data.message);
      }
    });
    if (!isDone) reply.interrupted();
  } catch (err) {
    if (waiting) waiting.stop();
    if (!reply) return; // nothing was sent yet
    reply.interrupted();
    if (err.name === "AbortError") {
      reply.note("");
      setStatus("Stopped.");
    } else {
      reply.failed("The connection was lost.");
    }
  } finally {
    if (waiting) waiting.stop();
    if (reply) reply.finish();
    controller = null;
    setBusy(false);
    input.focus();
  }
}

function send(text) {
  return ask({ message: text }, () => addMessage("user", text));
}

function regenerate() {
  return ask({ regenerate: true }, () => {
    const last = messagesEl.lastElementChild;
    if (last && last.classList.contains("assistant")) last.remove();
  });
}

async function newChat() {
  if (controller) controller.abort();
  const res = await api("/chat/clear", { method: "POST" });
  if (!res.ok) {
    setStatus(await errorText(res));
    return;
  }
  messagesEl.replaceChildren();
  setStatus("");
  input.focus();
}

// The conversation and the feedback on it, gone from the server, after the user confirms; the page
// then starts a new one.
async function deleteChat() {
  if (!window.confirm("Delete this conversation? It is removed from the server and cannot be brought back.")) return;
  if (controller) controller.abort();
  const res = await api("/chat/delete", { method: "POST" });
  if (!res.ok) {
    setStatus(await errorText(res));
    return;
  }
  messagesEl.replaceChildren();
  setStatus("Conversation deleted.");
  input.focus();
}

// The latest fetch of the history (at start, after each key change) and how many there were: an
// older fetch that answers late must not replace what a newer one shows.
let historyFetch = Promise.resolve(true);
let numHistoryFetches = 0;

// Fetch the conversation as the server has it and show it; false (and why, in the status line) if
// the server would not say. <body data-ready> is set while the page shows the latest one.
function showHistory() {
  const seq = ++numHistoryFetches;
  const isLatest = () => seq === numHistoryFetches;
  delete document.body.dataset.ready;
  historyFetch = loadHistory(isLatest)
    .catch(() => {
      if (isLatest()) setStatus("The server could not be reached.");
      return false;
    })
    .finally(() => {
      if (isLatest()) document.body.dataset.ready = "true";
    });
  return historyFetch;
}

// Until the latest fetch of the history, including any started while waiting, is shown.
async function historyShown() {
  let pending;
  do {
    pending = historyFetch;
    await pending;
  } while (pending !== historyFetch);
}

async function loadHistory(isLatest) {
  const res = await api("/chat/history");
  if (!isLatest()) return false;
  if (!res.ok) {
    setStatus(await errorText(res));
    return false;
  }
  const body = await res.json();
  if (!isLatest()) return false;
  messagesEl.replaceChildren();
  for (const m of body.messages) {
    addMessage(m.role, m.content, { messageId: m.message_id, interrupted: m.interrupted });
  }
  return true;
}

const paramsForm = $("params-form");

function showParams(body) {
  for (const name of ["temperature", "top_p", "top_k", "max_tokens"]) {
    const field = paramsForm.elements[name];
    const value = body.params[name];
    field.value = value == null ? "" : value;
    const [lo, hi] = body.limits[name];
    field.min = name === "top_p" ? "0.01" : lo;
    field.max = hi;
  }
  paramsForm.elements.max_tokens.placeholder = `default ${body.default_max_tokens}`;
}

async function loadParams() {
  const res = await api("/chat/params");
  if (res.ok) showParams(await res.json());
}

paramsForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const f = paramsForm.elements;
  const maxTokens = f.max_tokens.value.trim();
  const res = await api("/chat/params", {
    method: "PUT",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({
      temperature: Number(f.temperature.value),
      top_p: Number(f.top_p.value),
      top_k: Number(f.top_k.value),
      max_tokens: maxTokens === "" ? null : Number(maxTokens),
    }),
  });
  if (res.ok) {
    showParams(await res.json());
    $("params-status").textContent = "Saved.";
  } else {
    $("params-status").textContent = await errorText(res);
  }
});

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = input.value.trim();
  if (!text || controller) return;
  input.value = "";
  send(text);
});

input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});

stopBtn.addEventListener("click", () => controller && controller.abort());
$("new-chat").addEventListener("click", newChat);
$("delete-chat").addEventListener("click", deleteChat);

showHistory();
loadParams();
