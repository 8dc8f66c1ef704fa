// The key-management page: plain DOM, no framework. The admin key lives in sessionStorage
// only (never a URL, a cookie or localStorage); text is set with textContent, never HTML.
"use strict";

const STORAGE = "tga-admin-key";
const $ = (id) => document.getElementById(id);

function adminKey() { return sessionStorage.getItem(STORAGE); }

// The API's own words for an error, in any of the dialects it speaks.
function apiMessage(body, status) {
  if (body && typeof body === "object") {
    if (body.error && typeof body.error.message === "string") return body.error.message;
    if (typeof body.detail === "string") return body.detail;
    if (typeof body.msg === "string") return body.msg;
    if (typeof body.message === "string") return body.message;
  }
  return "The request failed (HTTP " + status + ").";
}

async function api(method, path, body) {
  const init = { method, headers: { "Authorization": "Bearer " + adminKey() }, cache: "no-store" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  let parsed = null;
  const text = await response.text();
  if (text) { try { parsed = JSON.parse(text); } catch (_) { parsed = null; } }
  if (!response.ok) throw new Error(apiMessage(parsed, response.status));
  return parsed;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function list(text) {
  return text.split(",").map((s) => s.trim()).filter((s) => s.length > 0);
}

function cell(row, label, text) {
  const td = document.createElement("td");
  td.dataset.label = label;
  td.textContent = text;
  row.appendChild(td);
  return td;
}

function when(rfc3339) {
  if (!rfc3339) return "never";
  return rfc3339.replace("T", " ").replace(/:00Z$/, "Z").replace("Z", " UTC");
}

function limitsText(k) {
  const parts = [];
  const l = k.limits;
  if (l) {
    if (l.requests_per_period) parts.push(l.requests_per_period + " req / " + (l.period || 60) + " s");
    if (l.max_concurrent) parts.push(l.max_concurrent + " in flight");
    if (l.tokens_per_period) parts.push(l.tokens_per_period + " tokens / " + (l.token_period || 60) + " s");
    if (l.token_budget) parts.push("budget " + l.token_budget + " tokens / " + (l.budget_period || "month"));
  }
  if (k.models) parts.push("models: " + k.models.join(", "));
  if (k.usage && k.usage.in_flight !== undefined) parts.push("in flight now: " + k.usage.in_flight);
  return parts.length ? parts.join("; ") : "none";
}

function showKey(key) {
  $("new-key-value").value = key;
  $("copy-status").textContent = "";
  $("new-key").hidden = false;
  $("new-key-value").focus();
  $("new-key-value").select();
}

function hideKey() {
  $("new-key-value").value = "";
  $("new-key").hidden = true;
}

function action(td, label, danger, question, run) {
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = label;
  if (danger) button.className = "danger";
  button.addEventListener("click", async () => {
    if (!window.confirm(question)) return;
    showError("");
    try { await run(); await refresh(); } catch (e) { showError(e.message); }
  });
  td.appendChild(button);
}

function row(k) {
  const tr = document.createElement("tr");
  tr.dataset.id = k.id;
  cell(tr, "Name", k.name + (k.parent ? " (ephemeral)" : ""));
  cell(tr, "Hint", k.hint);
  cell(tr, "Scopes", (k.scopes || []).join(", ") || "none");
  cell(tr, "Status", k.state === "usable" ? "active" : k.state.replace(/_/g, " "));
  cell(tr, "Created", when(k.created_at));
  cell(tr, "Expires", k.expires_at ? when(k.expires_at) : "never");
  cell(tr, "Last used", when(k.last_used_at));
  cell(tr, "Limits", limitsText(k));
  const td = cell(tr, "Actions", "");
  const id = encodeURIComponent(k.id);
  const name = "\u201c" + k.name + "\u201d";
  if (k.status !== "revoked") {
    action(td, "Revoke", true, "Revoke " + name + "? It stops working at once, for good.",
      () => api("POST", "keys/" + id + "/revoke"));
    if (k.status === "disabled") {
      action(td, "Enable", false, "Enable " + name + "?", () => api("POST", "keys/" + id + "/enable"));
    } else {
      action(td, "Disable", false, "Disable " + name + "? It can be enabled again.",
        () => api("POST", "keys/" + id + "/disable"));
    }
    if (!k.parent) {
      action(td, "Rotate", false, "Rotate " + name + "? A new key is issued; the old one keeps working for one hour.",
        async () => { const issued = await api("POST", "keys/" + id + "/rotate", { grace_seconds: 3600 }); showKey(issued.key); });
    }
  }
  action(td, "Delete", true, "Delete " + name + "? Its record is removed for good.",
    () => api("DELETE", "keys/" + id));
  return tr;
}

async function refresh() {
  const answer = await api("GET", "keys");
  const body = document.querySelector("#keys tbody");
  body.replaceChildren(...answer.keys.map(row));
}

async function signIn(key) {
  sessionStorage.setItem(STORAGE, key);
  try {
    await refresh();
  } catch (e) {
    sessionStorage.removeItem(STORAGE);
    throw e;
  }
  $("sign-in").hidden = true;
  $("manage").hidden = false;
  $("sign-out").hidden = false;
}

function signOut() {
  sessionStorage.removeItem(STORAGE);
  hideKey();
  document.querySelector("#keys tbody").replaceChildren();
  $("manage").hidden = true;
  $("sign-out").hidden = true;
  $("sign-in").hidden = false;
  $("admin-key").value = "";
}

function number(id) {
  const text = $(id).value.trim();
  return text ? Number(text) : null;
}

async function create(event) {
  event.preventDefault();
  showError("");
  const body = { name: $("create-name").value.trim(), scopes: list($("create-scopes").value) };
  if ($("create-never").checked) body.never_expires = true;
  else if (number("create-days")) body.ttl_days = number("create-days");
  const limits = {};
  if (number("create-rpm")) { limits.requests_per_period = number("create-rpm"); limits.period = 60; }
  if (number("create-concurrent")) limits.max_concurrent = number("create-concurrent");
  if (number("create-tpm")) { limits.tokens_per_period = number("create-tpm"); limits.token_period = 60; }
  if (Object.keys(limits).length) body.limits = limits;
  const models = list($("create-models").value);
  if (models.length) body.models = models;
  try {
    const issued = await api("POST", "keys", body);
    $("create-form").reset();
    showKey(issued.key);
    await refresh();
  } catch (e) { showError(e.message); }
}

async function mint(event) {
  event.preventDefault();
  showError("");
  const body = {};
  if (number("ephemeral-ttl")) body.ttl_seconds = number("ephemeral-ttl");
  const scopes = list($("ephemeral-scopes").value);
  if (scopes.length) body.scopes = scopes;
  try {
    const issued = await api("POST", "ephemeral", body);
    showKey(issued.key);
    await refresh();
  } catch (e) { showError(e.message); }
}

document.addEventListener("DOMContentLoaded", () => {
  $("sign-in-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    showError("");
    try { await signIn($("admin-key").value.trim()); } catch (e) { showError(e.message); }
    $("admin-key").value = "";
  });
  $("sign-out").addEventListener("click", signOut);
  $("create-form").addEventListener("submit", create);
  $("ephemeral-form").addEventListener("submit", mint);
  $("refresh").addEventListener("click", () => refresh().catch((e) => showError(e.message)));
  $("dismiss-key").addEventListener("click", hideKey);
  $("copy-key").addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText($("new-key-value").value);
      $("copy-status").textContent = "Copied.";
    } catch (_) {
      $("new-key-value").select();
      $("copy-status").textContent = "Select the key and copy it by hand.";
    }
  });
  if (adminKey()) signIn(adminKey()).catch((e) => { signOut(); showError(e.message); });
});
