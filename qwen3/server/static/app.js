// The chat page: sends the conversation to /v1/chat/completions and shows the reply as it streams.
//
// Everything the model or the user wrote is put into the page with textContent, never parsed as
// HTML, so a reply containing <script> is shown as text. The conversation and settings live in
// localStorage (the API key in sessionStorage, so it is forgotten with the tab).
"use strict";

const STORAGE_KEY = "qwen3-chat";
const KEY_STORAGE_KEY = "qwen3-chat-api-key";
const SETTINGS = ["temperature", "top_p", "top_k", "max_tokens", "system"];

const $ = (id) => document.getElementById(id);

const state = {
  model: null,
  messages: [],   // {role, content} of the whole conversation, as shown
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
  if (Array.isArray(saved.messages)) {
    state.messages = saved.messages.filter(
      (m) => m && typeof m.content === "string" && (m.role === "user" || m.role === "assistant"));
    state.first = Math.min(Number(saved.first) || 0, state.messages.length);
  }
  $("api-key").value = sessionStorage.getItem(KEY_STORAGE_KEY) || "";
  state.messages.forEach((message, index) => {
    const item = addMessage(message.role, message.content);
    if (index < state.first) item.classList.add("forgotten");
  });
}

function save() {
  const settings = Object.fromEntries(SETTINGS.map((name) => [name, $(name).value]));
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
    return { message: body.error.message, code: body.error.code };
  } catch {
    return { message: `${response.status} ${response.statusText}`, code: null };
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
    $("model").textContent = `${state.model} · ${body.data[0].context_length} tokens`;
    $("status").className = "status ok";
  } catch (error) {
    $("model").textContent = "server unreachable";
    $("status").className = "status error";
  }
}

function requestBody(limited) {
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
  const maxTokens = parseInt($("max_tokens").value, 10);
  if (limited && maxTokens > 0) body.max_tokens = maxTokens;
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

// POST the conversation. While it does not fit the model's context with room for max tokens, stop
// sending the oldest turn; once only the last message is left, let the reply have the room there is.
async function openStream(signal) {
  let limited = true;
  for (;;) {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody(limited)), signal,
    });
    if (response.ok) return response;
    const error = await errorMessage(response);
    if (error.code !== "context_length_exceeded") throw new Error(error.message);
    if (state.messages.length - state.first > 1) {
      // Forget up to the next user message, so the conversation still starts with one.
      do state.first += 1;
      while (state.first < state.messages.length - 1 && state.messages[state.first].role !== "user");
      const items = $("messages").querySelectorAll(".message.user, .message.assistant");
      items.forEach((item, index) => item.classList.toggle("forgotten", index < state.first));
    } else if (limited && error.param === "max_tokens") {
      limited = false;
    } else {
      throw new Error(error.message);
    }
  }
}

async function send(text) {
  if (!state.model) await connect();
  if (!state.model) {
    notice("The server cannot be reached, or it needs an API key (see Settings).");
    return;
  }
  state.messages.push({ role: "user", content: text });
  const userItem = addMessage("user", text);
  const item = addMessage("assistant", "");
  const content = item.querySelector(".content");
  item.classList.add("streaming");
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  let reply = "";
  let failed = false;
  try {
    const response = await openStream(controller.signal);
    for await (const chunk of serverEvents(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) {
        reply += choice.delta.content;
        content.textContent = reply;
        scrollToEnd();
      }
      if (choice.finish_reason === "length") item.dataset.outcome = "reached the token limit";
    }
  } catch (error) {
    if (error.name === "AbortError") {
      item.dataset.outcome = "stopped";
    } else {
      failed = true;
      notice(error.message);
    }
  } finally {
    state.controller = null;
    item.classList.remove("streaming");
    if (failed && !reply) {
      // Nothing came back: take the message back into the box to retry.
      state.messages.pop();
      userItem.remove();
      item.remove();
      $("input").value = text;
    } else {
      state.messages.push({ role: "assistant", content: reply });
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

function init() {
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
  $("toggle-settings").addEventListener("click", () => {
    const hidden = $("settings").classList.toggle("collapsed");
    $("toggle-settings").setAttribute("aria-expanded", String(!hidden));
  });
  for (const name of SETTINGS) {
    $(name).addEventListener("input", () => { showSettingValues(); save(); });
  }
  $("api-key").addEventListener("change", () => { save(); connect(); });
  $("input").focus();
}

init();
