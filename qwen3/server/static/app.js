// The chat page: sends the conversation to /v1/chat/completions and shows the reply as it streams.
//
// Everything the model or the user wrote is put into the page with textContent, never parsed as
// HTML, so a reply containing <script> is shown as text. A reply's thinking (reasoning_content)
// streams into a folded block above its answer, and its tool calls show as JSON below it. The
// conversation and settings live in localStorage (the API key in sessionStorage, so it is
// forgotten with the tab).
"use strict";

const STORAGE_KEY = "qwen3-chat";
const KEY_STORAGE_KEY = "qwen3-chat-api-key";
const SETTINGS = ["temperature", "top_p", "top_k", "max_tokens", "system", "tools"];
const SWITCHES = ["think"];  // checkboxes

const $ = (id) => document.getElementById(id);

const state = {
  model: null,
  context: null,  // the model's context length in tokens, from /v1/models
  thinking: false,  // whether its chat template has a thinking mode (enable_thinking)
  messages: [],   // {role, content[, reasoning_content, tool_calls]} of the whole conversation, as shown
  first: 0,       // index of the oldest message still sent (older ones no longer fit the context)
  controller: null,
};

// --- storage ---

function restore() {
  let saved = {};
  try {
    saved = JSON.parse(localStorage.getItem(STORAGE_KEY) || "{}");
  } catch {
    saved = {};
  }
  for (const name of SETTINGS) {
    if (saved.settings && typeof saved.settings[name] === "string") $(name).value = saved.settings[name];
  }
  for (const name of SWITCHES) {
    if (saved.settings && typeof saved.settings[name] === "boolean") $(name).checked = saved.settings[name];
  }
  if (Array.isArray(saved.messages)) {
    state.messages = saved.messages.filter(
      (m) => m && typeof m.content === "string" && (m.role === "user" || m.role === "assistant")
        && (m.reasoning_content === undefined || typeof m.reasoning_content === "string")
        && (m.tool_calls === undefined || Array.isArray(m.tool_calls)));
    state.first = Math.min(Number(saved.first) || 0, state.messages.length);
  }
  $("api-key").value = sessionStorage.getItem(KEY_STORAGE_KEY) || "";
  for (const message of state.messages) {
    const item = addMessage(message.role, message.content);
    if (message.reasoning_content) showThinking(item, message.reasoning_content, false);
    if (message.tool_calls) showToolCalls(item, message.tool_calls);
  }
  markForgotten();
}

function save() {
  const settings = Object.fromEntries([
    ...SETTINGS.map((name) => [name, $(name).value]), ...SWITCHES.map((name) => [name, $(name).checked])]);
  localStorage.setItem(STORAGE_KEY, JSON.stringify({ settings, messages: state.messages, first: state.first }));
  sessionStorage.setItem(KEY_STORAGE_KEY, $("api-key").value);
}

// --- rendering (textContent only) ---

function addMessage(role, text) {
  const item = document.createElement("li");
  item.className = `message ${role}`;
  const label = document.createElement("div");
  label.className = "role";
  label.textContent = { user: "You", assistant: state.model || "Model", notice: "Notice" }[role];
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  item.append(label, content);
  $("messages").append(item);
  $("empty").hidden = true;
  scrollToEnd();
  return item;
}

// The reply's thinking, in a folded block above its answer ("Thinking…" while it streams).
function showThinking(item, text, streaming) {
  let block = item.querySelector(".thinking");
  if (!block) {
    block = document.createElement("details");
    block.className = "thinking";
    const summary = document.createElement("summary");
    const body = document.createElement("div");
    body.className = "thinking-text";
    block.append(summary, body);
    item.querySelector(".content").before(block);
  }
  block.querySelector("summary").textContent = streaming ? "Thinking…" : "Thought";
  block.querySelector(".thinking-text").textContent = text;
}

// The reply's tool calls, as the API returned them (the page shows them; it runs nothing).
function showToolCalls(item, calls) {
  let block = item.querySelector(".tool-calls");
  if (!block) {
    block = document.createElement("pre");
    block.className = "tool-calls";
    item.querySelector(".content").after(block);
  }
  block.textContent = JSON.stringify(calls, null, 2);
}

function notice(text) {
  addMessage("notice", text);
}

function scrollToEnd() {
  const log = $("log");
  log.scrollTop = log.scrollHeight;
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("input").disabled = busy;
  document.body.classList.toggle("busy", busy);
  if (!busy) $("input").focus();
}

function showSettingValues() {
  $("temperature-value").textContent = Number($("temperature").value).toFixed(2);
  $("top_p-value").textContent = Number($("top_p").value).toFixed(2);
}

// --- talking to the server ---

function headers() {
  const result = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return { message: body.error.message, code: body.error.code, param: body.error.param };
  } catch {
    return { message: `${response.status} ${response.statusText}`, code: null, param: null };
  }
}

async function connect() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (response.status === 401) {
      $("model").textContent = "API key needed";
      $("status").className = "status warn";
      return;
    }
    if (!response.ok) throw new Error((await errorMessage(response)).message);
    const body = await response.json();
    state.model = body.data[0].id;
    state.context = Number(body.data[0].context_length) || null;
    state.thinking = body.data[0].thinking === true;
    $("think-setting").hidden = !state.thinking;
    $("model").textContent = state.context ? `${state.model} · ${state.context}-token context` : state.model;
    $("model").title = `${$("model").textContent}: the model this server serves`;
    $("status").className = "status ok";
  } catch (error) {
    $("model").textContent = "server unreachable";
    $("status").className = "status error";
  }
}

function requestBody(maxTokens) {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.messages.slice(state.first));
  const body = {
    model: state.model,
    messages,
    stream: true,
    temperature: Number($("temperature").value),
    top_p: Number($("top_p").value),
  };
  const topK = parseInt($("top_k").value, 10);
  if (topK > 0) body.top_k = topK;
  if (maxTokens !== null) body.max_tokens = maxTokens;
  if (state.thinking) body.chat_template_kwargs = { enable_thinking: $("think").checked };
  const tools = $("tools").value.trim();
  if (tools) {
    try {
      body.tools = JSON.parse(tools);
    } catch (error) {
      throw new Error(`The Tools setting is not valid JSON (${error.message})`);
    }
  }
  return body;
}

// Server-sent events of a fetch response body -> parsed JSON objects, until "data: [DONE]".
async function* serverEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

// The reply lengths to ask for, most wanted first (null: all the context has left). Like `qwen3
// chat`: the Max tokens setting when it fits, else at most half the context, so that a long setting
// does not erase the whole history; once only the latest message is sent, whatever room is left.
function replyLimits(alone) {
  const setting = parseInt($("max_tokens").value, 10);
  const wanted = setting > 0 ? setting : Infinity;
  const context = state.context || Infinity;
  const limits = [];
  if (wanted < context) limits.push(wanted);
  const half = Math.max(1, Math.floor(context / 2));
  if (!alone && half < wanted) limits.push(half);
  if (alone || !limits.length) limits.push(null);  // alone, the room left is all the reply can have
  return limits;
}

// Fade the messages that are no longer sent, and say once, above the first one still sent, why.
function markForgotten() {
  const items = [...$("messages").querySelectorAll(".message.user, .message.assistant")];
  items.forEach((item, index) => {
    item.classList.toggle("forgotten", index < state.first);
    item.title = index < state.first ? "no longer sent to the model" : "";
  });
  let divider = $("forgotten-divider");
  if (state.first === 0 || state.first >= items.length) {
    if (divider) divider.remove();
    return;
  }
  if (!divider) {
    divider = document.createElement("li");
    divider.id = "forgotten-divider";
    divider.className = "divider";
  }
  const context = state.context ? `${state.context}-token ` : "";
  divider.textContent = `Earlier messages no longer fit the model's ${context}context and are not sent.`;
  items[state.first].before(divider);
}

class TooLong extends Error {}

// POST the conversation; the response and the max_tokens it was sent with. While it does not fit
// the context with room for a reply, stop sending the oldest exchange (a user message and the
// reply to it). Throws TooLong when even the latest message alone leaves no room.
async function openStream(signal) {
  for (;;) {
    const alone = state.messages.length - state.first <= 1;
    for (const limit of replyLimits(alone)) {
      const response = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(requestBody(limit)), signal,
      });
      if (response.ok) return { response, limit };
      const error = await errorMessage(response);
      if (error.code !== "context_length_exceeded") throw new Error(error.message);
      if (error.param !== "max_tokens") break;  // the prompt itself fills the context
    }
    if (alone) throw new TooLong();
    // Forget up to the next user message, so the conversation still starts with one.
    do state.first += 1;
    while (state.first < state.messages.length - 1 && state.messages[state.first].role !== "user");
    markForgotten();
  }
}

// What the reply's footnote says when it was cut at the token limit.
function limitOutcome(limit) {
  const setting = parseInt($("max_tokens").value, 10);
  if (limit !== null && !(setting > limit)) return "reached the token limit";
  return `cut to fit the model's ${state.context ? `${state.context}-token ` : ""}context`;
}

async function send(text) {
  if (!state.model) await connect();
  if (!state.model) {
    notice("The server cannot be reached, or it needs an API key (see Settings). Your message is back in the box.");
    $("input").value = text;
    return;
  }
  const firstBefore = state.first;
  state.messages.push({ role: "user", content: text });
  const userItem = addMessage("user", text);
  const item = addMessage("assistant", "");
  const content = item.querySelector(".content");
  item.classList.add("streaming");
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  let reply = "";
  let reasoning = "";
  const calls = [];
  let failed = false;
  try {
    const { response, limit } = await openStream(controller.signal);
    for await (const chunk of serverEvents(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices[0];
      if (!choice) continue;
      const delta = choice.delta || {};
      if (delta.reasoning_content) {
        reasoning += delta.reasoning_content;
        showThinking(item, reasoning, true);
      }
      if (delta.content) {
        reply += delta.content;
        content.textContent = reply;
      }
      for (const call of delta.tool_calls || []) {
        calls[call.index] = { id: call.id, type: call.type, function: call.function };
        showToolCalls(item, calls);
      }
      scrollToEnd();
      if (choice.finish_reason === "length") item.dataset.outcome = limitOutcome(limit);
    }
  } catch (error) {
    if (error.name === "AbortError") {
      item.dataset.outcome = "stopped";
    } else {
      failed = true;
      notice(error instanceof TooLong
        ? `This message is too long for the model's ${state.context}-token context, even on its own. ` +
          "It is back in the box: shorten it and send it again."
        : `${error.message}${reply ? "" : ". Your message is back in the box."}`);
    }
  } finally {
    state.controller = null;
    item.classList.remove("streaming");
    if (reasoning) showThinking(item, reasoning, false);
    if (failed && !reply && !reasoning && !calls.length) {
      // Nothing came back: the message goes back into the box, and the history as it was.
      state.messages.pop();
      userItem.remove();
      item.remove();
      state.first = firstBefore;
      markForgotten();
      $("input").value = text;
    } else {
      const message = { role: "assistant", content: reply };
      if (reasoning) message.reasoning_content = reasoning;
      if (calls.length) message.tool_calls = calls;
      state.messages.push(message);
    }
    save();
    setBusy(false);
  }
}

// --- wiring ---

function newChat() {
  if (state.controller) state.controller.abort();
  state.messages = [];
  state.first = 0;
  $("messages").replaceChildren();
  $("empty").hidden = false;
  save();
  $("input").focus();
}

function toggleSettings() {
  const hidden = $("settings").classList.toggle("collapsed");
  $("toggle-settings").setAttribute("aria-expanded", String(!hidden));
}

function init() {
  if (window.matchMedia("(max-width: 760px)").matches) toggleSettings();  // on a phone it would cover the chat
  restore();
  showSettingValues();
  connect();

  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("input").value;
    if (!text.trim() || state.controller) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("new-chat").addEventListener("click", newChat);
  $("toggle-settings").addEventListener("click", toggleSettings);
  for (const name of [...SETTINGS, ...SWITCHES]) {
    $(name).addEventListener("input", () => { showSettingValues(); save(); });
  }
  $("api-key").addEventListener("change", () => { save(); connect(); });
  $("input").focus();
}

init();
