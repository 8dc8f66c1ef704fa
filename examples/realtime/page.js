// The browser side of the realtime example: mint, then connect. What happened is kept in
// `window.state` too, for the headless-Chromium test.
"use strict";

const state = (window.state = {
  fetchStatus: null,
  fetchError: null,
  opened: false,
  protocol: null,
  messages: [],
  closed: null,
  error: false,
});
let socket = null;

const $ = (id) => document.getElementById(id);
function log(line) {
  $("log").textContent += line + "\n";
}

async function connect() {
  $("connect").disabled = true;
  // 1. The backend (same origin as this page) mints a key for this page alone.
  const minted = await fetch("/session", { method: "POST" });
  if (!minted.ok) {
    log("the backend could not mint a key: " + minted.status + " " + (await minted.text()));
    $("connect").disabled = false;
    return;
  }
  const session = await minted.json();
  log("minted an ephemeral key, expires " + session.expires_at);
  const base = session.gateway + session.route;

  // 2. A cross-origin HTTP call with the key in a header: the browser sends a preflight
  //    first, which the gateway answers itself (no key needed, never forwarded).
  try {
    const answer = await fetch(base + "/v1/models", {
      headers: { Authorization: "Bearer " + session.key },
    });
    state.fetchStatus = answer.status;
    log("fetch " + base + "/v1/models: " + answer.status);
  } catch (e) {
    state.fetchError = String(e);
    log("fetch blocked by the browser (CORS): " + e);
  }

  // 3. The realtime socket, the key in the subprotocol list next to `realtime`. The
  //    gateway removes the key entry; the upstream answers `realtime`, which is one this
  //    page offered, so the browser accepts the socket.
  const url = base.replace(/^http/, "ws") + "/v1/realtime?model=gpt-realtime";
  socket = new WebSocket(url, ["realtime", "openai-insecure-api-key." + session.key]);
  socket.onopen = () => {
    state.opened = true;
    state.protocol = socket.protocol;
    log("socket open, subprotocol " + JSON.stringify(socket.protocol));
    $("send").disabled = false;
    $("close").disabled = false;
    send();
  };
  socket.onmessage = (event) => {
    state.messages.push(String(event.data));
    log("received: " + event.data);
  };
  socket.onerror = () => {
    state.error = true;
    log("socket error");
  };
  socket.onclose = (event) => {
    state.closed = { code: event.code, reason: event.reason };
    log("socket closed: " + event.code + " " + event.reason);
    $("send").disabled = true;
    $("close").disabled = true;
    $("connect").disabled = false;
  };
}

function send() {
  if (socket && socket.readyState === WebSocket.OPEN) {
    socket.send($("message").value);
    log("sent: " + $("message").value);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("connect").addEventListener("click", () => connect().catch((e) => log(String(e))));
  $("send").addEventListener("click", send);
  $("close").addEventListener("click", () => socket && socket.close(1000, "done"));
});
