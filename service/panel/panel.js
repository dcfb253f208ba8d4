// gpuyard queue panel: plain JavaScript, no build step.
//
// Every read and every action goes through the public API with the viewer's token; the
// server enforces permissions, the page only hides what the viewer may not do. Live
// updates: once a second the page asks GET /api/panel/changes for the last event's seq
// and reloads its data only when that moved (or once a minute, for aging). Strings from
// the API are always inserted as text, never as markup.
"use strict";

(() => {
  const TOKEN_KEY = "gpuyard.token";
  const POLL_MS = 1000;
  const HIDDEN_POLL_MS = 5000;
  const FULL_REFRESH_MS = 60000;
  const LIST_LIMIT = 200;
  const LOG_TAIL = 200;
  const LIVE = new Set(["pending", "blocked", "running"]);

  // Every field of GET/POST /api/queue/concurrency, in the order the form shows them.
  const SETTINGS = [
    { name: "max_concurrent", label: "Max concurrent", kind: "int", hint: "running jobs, all targets" },
    { name: "user_max_concurrent", label: "Per user", kind: "int", hint: "running jobs per user" },
    { name: "team_max_concurrent", label: "Per team", kind: "int", hint: "with fair share on" },
    { name: "enable_fair_share", label: "Fair-share scheduling", kind: "bool", hint: "per-team limits" },
    { name: "local_gpu_max_concurrent", label: "Local GPUs", kind: "int-or-null", hint: "empty = unlimited" },
    { name: "local_job_max_concurrent", label: "Local jobs", kind: "int", hint: "running local jobs" },
    { name: "starvation_threshold_minutes", label: "Aging threshold (min)", kind: "number", hint: "wait per boost" },
    { name: "starvation_boost", label: "Aging boost", kind: "int", hint: "priority per threshold" },
    { name: "approval_cost_threshold", label: "Approval cost threshold", kind: "number", hint: "above it: blocked" },
    { name: "approval_timeout_hours", label: "Approval timeout (h)", kind: "number", hint: "then rejected" },
    { name: "cancel_grace_seconds", label: "Cancel grace (s)", kind: "number", hint: "SIGTERM → SIGKILL" },
  ];

  const view = {
    me: null,          // GET /api/whoami
    seq: null,         // last seq the shown data is at least as new as
    lastFull: 0,       // Date.now() of the last full reload
    skewMs: 0,         // server clock minus browser clock
    users: new Map(),  // user_id -> name (admins only)
    settings: null,    // last settings from the server
    entries: new Map(),
    seenUsers: new Set(), // user ids met in listings (leads have no user list)
    detail: null,      // what the detail dialog shows: {kind, jobId}
    timer: null,
    polling: false,    // a tick is in flight
    stale: false,      // what is shown no longer matches the filters or the token
  };

  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------------ the API

  class ApiError extends Error {
    constructor(status, detail, body) {
      super(detail);
      this.status = status;
      this.detail = detail;
      this.body = body;
    }
  }

  function token() {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  }

  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    const bearer = token();
    if (bearer) headers.Authorization = "Bearer " + bearer;
    const init = { method, headers, cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      throw new ApiError(0, "the server cannot be reached", null);
    }
    const text = await response.text();
    let data = text;
    if ((response.headers.get("content-type") || "").includes("json") && text) {
      try { data = JSON.parse(text); } catch (err) { data = text; }
    }
    if (!response.ok) {
      const detail = data && typeof data === "object" && data.detail
        ? String(data.detail) : `HTTP ${response.status}`;
      throw new ApiError(response.status, detail, data);
    }
    return data;
  }

  const jobPath = (jobId, action) =>
    `/api/queue/${encodeURIComponent(jobId)}${action ? "/" + action : ""}`;

  // ------------------------------------------------------------------ formatting

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("data-")) node.setAttribute(key, String(value));
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
    const s = Math.max(0, seconds);
    if (s < 10) return `${s.toFixed(1)}s`;
    if (s < 60) return `${Math.floor(s)}s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m}m ${String(Math.floor(s % 60)).padStart(2, "0")}s`;
    const h = Math.floor(m / 60);
    if (h < 24) return `${h}h ${String(m % 60).padStart(2, "0")}m`;
    return `${Math.floor(h / 24)}d ${h % 24}h`;
  }

  const serverNow = () => Date.now() + view.skewMs;
  const ms = (iso) => (iso ? Date.parse(iso) : null);

  function userName(userId) {
    if (view.me && userId === view.me.user_id) return view.me.name + " (you)";
    return view.users.get(userId) || `user ${userId}`;
  }

  // ------------------------------------------------------------------ permissions (display only)

  const isAdmin = () => view.me && view.me.level === "admin";
  const seesAll = () => view.me && (view.me.level === "admin" || view.me.level === "lead");

  function allowedActions(entry) {
    const actions = [];
    const own = view.me && entry.user_id === view.me.user_id;
    if (LIVE.has(entry.status) && (own || seesAll())) actions.push("cancel");
    if (entry.status === "blocked" && isAdmin()) actions.push("approve", "reject");
    if ((entry.status === "pending" || entry.status === "blocked") && seesAll()) actions.push("priority");
    if (entry.status === "pending" || entry.status === "blocked") actions.push("explain");
    actions.push("logs");
    return actions;
  }

  const ACTION_LABELS = {
    cancel: "Cancel", approve: "Approve", reject: "Reject", priority: "Priority",
    explain: "Why waiting?", logs: "Logs",
  };

  // ------------------------------------------------------------------ rendering

  function setFigure(id, raw, shown) {
    const value = $(id).querySelector(".value");
    value.dataset.value = raw === null || raw === undefined ? "" : String(raw);
    value.textContent = shown;
  }

  function renderFigures(stats) {
    setFigure("fig-queued", stats.queue_depth, String(stats.queue_depth));
    setFigure("fig-running", stats.running, String(stats.running));
    setFigure("fig-max-concurrent", stats.max_concurrent, String(stats.max_concurrent));
    setFigure("fig-avg-wait", stats.avg_wait_seconds, duration(stats.avg_wait_seconds));
    setFigure("fig-blocked", stats.blocked, String(stats.blocked));
    const local = stats.local;
    $("fig-running-caption").textContent =
      `local ${local.running_jobs}/${local.max_concurrent_jobs} · GPUs ${local.allocated_gpus.length}/${local.total_gpus}`;
    $("fig-max-caption").textContent =
      `per user ${stats.user_max_concurrent}` +
      (stats.enable_fair_share ? ` · per team ${stats.team_max_concurrent}` : " · fair share off");
  }

  function priorityCell(entry) {
    const base = entry.priority_override ?? entry.priority;
    const cell = el("td", { class: "col-priority", "data-label": "Priority" },
      el("span", { class: "prio", text: String(entry.effective_priority) }));
    if (entry.priority_override !== null && entry.priority_override !== undefined) {
      cell.append(el("span", { class: "tag override", title: `base ${entry.priority}`,
        text: `override ${entry.priority_override}` }));
    }
    if (entry.effective_priority !== base) {
      cell.append(el("span", { class: "tag aged", text: `aged from ${base}` }));
    }
    return cell;
  }

  function statusCell(entry) {
    const cell = el("td", { class: "col-status", "data-label": "Status" },
      el("span", { class: `badge s-${entry.status}`, text: entry.status }));
    if (entry.status === "failed" && entry.exit_code !== null) {
      cell.append(el("span", { class: "note", text: `exit ${entry.exit_code}` }));
    }
    if (entry.error_message && !LIVE.has(entry.status)) {
      cell.append(el("span", { class: "note", title: entry.error_message, text: entry.error_message }));
    }
    if (entry.attempt > 1) cell.append(el("span", { class: "note", text: `attempt ${entry.attempt}/${entry.max_attempts}` }));
    return cell;
  }

  function gpuText(entry) {
    if (entry.allocated_gpus && entry.allocated_gpus.length) {
      return `${entry.allocated_gpus.length > 1 ? "GPUs" : "GPU"} ${entry.allocated_gpus.join(", ")}`;
    }
    if (entry.num_processes === 0) return "CPU";
    return `needs ${entry.num_processes}`;
  }

  // [time waited in the queue, time running or run] for a row, from its data attributes.
  function waitedTexts(row) {
    const queued = Number(row.dataset.queuedAt);
    const started = row.dataset.startedAt ? Number(row.dataset.startedAt) : null;
    const completed = row.dataset.completedAt ? Number(row.dataset.completedAt) : null;
    const status = row.dataset.status;
    const now = serverNow();
    if (status === "pending" || status === "blocked") return [duration((now - queued) / 1000), ""];
    if (status === "running" && started !== null) {
      return [duration((started - queued) / 1000), `running ${duration((now - started) / 1000)}`];
    }
    if (started !== null && completed !== null) {
      return [duration((started - queued) / 1000), `ran ${duration((completed - started) / 1000)}`];
    }
    return [completed !== null ? duration((completed - queued) / 1000) : "–", ""];
  }

  function showWaited(row) {
    const [waited, ran] = waitedTexts(row);
    const cell = row.querySelector(".col-waited");
    cell.querySelector(".waited").textContent = waited;
    cell.querySelector(".elapsed").textContent = ran;
  }

  function renderRow(entry) {
    const row = el("tr", {
      "data-job-id": entry.job_id, "data-status": entry.status, "data-user-id": entry.user_id,
      "data-queued-at": ms(entry.queued_at), "data-started-at": ms(entry.started_at),
      "data-completed-at": ms(entry.completed_at),
    });
    const runName = entry.metadata && typeof entry.metadata.run_name === "string" ? entry.metadata.run_name : null;
    row.append(
      el("td", { class: "col-pos", "data-label": "#", text: entry.position ?? "" }),
      el("td", { class: "col-job", "data-label": "Job" },
        el("code", { text: entry.job_id }), runName && el("span", { class: "note", text: runName })),
      el("td", { class: "col-user", "data-label": "User", text: userName(entry.user_id) }),
      el("td", { class: "col-team", "data-label": "Team", text: entry.team_id ?? "–" }),
      el("td", { class: "col-config", "data-label": "Config", text: entry.config_name }),
      priorityCell(entry),
      statusCell(entry),
      el("td", { class: "col-gpus", "data-label": "GPUs", text: gpuText(entry) }),
      el("td", { class: "col-waited", "data-label": "Waited" },
        el("span", { class: "waited" }), el("span", { class: "elapsed note" })),
    );
    const actions = el("td", { class: "col-actions", "data-label": "Actions" });
    for (const action of allowedActions(entry)) {
      const danger = action === "cancel" || action === "reject";
      actions.append(el("button", {
        type: "button", class: `act${danger ? " danger" : ""}${action === "logs" || action === "explain" ? " secondary" : ""}`,
        "data-action": action, "data-job-id": entry.job_id, text: ACTION_LABELS[action],
      }));
    }
    row.append(actions);
    showWaited(row);
    return row;
  }

  function renderQueue(listing) {
    view.entries = new Map(listing.entries.map((entry) => [entry.job_id, entry]));
    const rows = listing.entries.map(renderRow);
    $("queue-rows").replaceChildren(...rows);
    $("queue-empty").hidden = rows.length > 0;
    $("queue-count").textContent =
      `${rows.length} shown · ${listing.total_pending} pending, ${listing.total_running} running, ` +
      `${listing.total_blocked} blocked in the whole queue`;
  }

  function renderClocks() {
    for (const row of $("queue-rows").children) {
      showWaited(row);
    }
  }

  function renderGpus(system) {
    const allocation = system.gpu_allocation;
    const devices = allocation ? allocation.devices : [];
    const items = devices.map((device) => el("li", {
      class: `gpu ${device.allocated ? "held" : "free"}`, "data-index": device.index,
      "data-job-id": device.job_id,
    },
      el("span", { class: "gpu-index", text: `GPU ${device.index}` }),
      el("span", { class: "gpu-model", text: `${device.name} · ${device.memory_gb} GB` }),
      el("span", { class: "gpu-state", text: device.allocated ? `held by ${device.job_id}` : "free" }),
    ));
    if (!items.length) items.push(el("li", { class: "muted", text: "no GPUs in the inventory" }));
    $("gpu-map").replaceChildren(...items);
    const held = allocation ? allocation.allocated_gpus.length : 0;
    const inventory = system.gpu_inventory;
    $("gpu-summary").textContent =
      `${held} of ${devices.length} held · ${inventory.backend} inventory` +
      (system.load_avg_5min !== null ? ` · load ${system.load_avg_5min}` : "") +
      (system.memory_percent !== null ? ` · memory ${system.memory_percent}%` : "");
  }

  function renderWho() {
    const me = view.me;
    const who = $("who");
    who.hidden = false;
    who.replaceChildren(
      el("strong", { text: me.name }),
      ` · ${me.level}`,
      me.team_id ? ` · team ${me.team_id}` : "",
      me.single_user_mode ? " · single-user mode" : "",
    );
    document.body.dataset.level = me.level;
  }

  function renderUserFilter() {
    const select = $("filter-user");
    $("filter-user-label").hidden = !seesAll();
    const chosen = select.value;
    for (const entry of view.entries.values()) view.seenUsers.add(entry.user_id);
    const ids = new Set([...view.users.keys(), ...view.seenUsers]);
    if (view.me) ids.delete(view.me.user_id);
    const others = [...ids].sort((a, b) => a - b).map((id) => [String(id), userName(id)]);
    const key = JSON.stringify(others);
    if (select.dataset.key === key) return; // unchanged: leave an open dropdown alone
    select.dataset.key = key;
    const options = [el("option", { value: "", text: "everyone" }), el("option", { value: "me", text: "me" })];
    for (const [value, text] of others) options.push(el("option", { value, text }));
    select.replaceChildren(...options);
    select.value = [...select.options].some((o) => o.value === chosen) ? chosen : "";
  }

  // ------------------------------------------------------------------ settings

  function formatSetting(field, value) {
    if (field.kind === "bool") return Boolean(value);
    return value === null || value === undefined ? "" : String(value);
  }

  function buildSettingsForm() {
    const fields = SETTINGS.map((field) => {
      const id = `set-${field.name}`;
      const input = field.kind === "bool"
        ? el("input", { id, name: field.name, type: "checkbox" })
        : el("input", { id, name: field.name, type: "text", spellcheck: "false",
          inputmode: field.kind === "number" ? "decimal" : "numeric" });
      return el("div", { class: `field${field.kind === "bool" ? " check" : ""}`, "data-field": field.name },
        el("label", { for: id, text: field.label }),
        input,
        el("small", { class: "hint", text: `${field.name} · ${field.hint}` }),
        el("span", { class: "field-error", role: "alert" }));
    });
    $("settings-fields").replaceChildren(...fields);
  }

  function inputOf(name) {
    return $(`set-${name}`);
  }

  function readInput(field) {
    const input = inputOf(field.name);
    if (field.kind === "bool") return input.checked;
    const text = input.value.trim();
    if (field.kind === "int-or-null" && text === "") return null;
    if ((field.kind === "int" || field.kind === "int-or-null") && /^[+-]?\d+$/.test(text)) return Number(text);
    if (field.kind === "number" && text !== "" && Number.isFinite(Number(text))) return Number(text);
    return text; // not a number: the server says why
  }

  function fillSettings(settings, force) {
    const old = view.settings;
    for (const field of SETTINGS) {
      const input = inputOf(field.name);
      const fresh = formatSetting(field, settings[field.name]);
      const shown = field.kind === "bool" ? input.checked : input.value;
      const untouched = !old || shown === formatSetting(field, old[field.name]);
      if (force || untouched) {
        if (field.kind === "bool") input.checked = fresh; else input.value = fresh;
      }
    }
    view.settings = settings;
  }

  function clearFieldErrors() {
    for (const node of document.querySelectorAll("#settings-fields .field")) {
      node.classList.remove("invalid");
      node.querySelector(".field-error").textContent = "";
    }
  }

  function showFieldErrors(err) {
    const named = new Set();
    const extra = err.body && Array.isArray(err.body.extra) ? err.body.extra : [];
    for (const item of extra) {
      if (SETTINGS.some((field) => field.name === item.key)) named.add(item.key);
    }
    if (!named.size) {
      for (const field of SETTINGS) {
        if (new RegExp(`\\b${field.name}\\b`).test(err.detail)) named.add(field.name);
      }
    }
    for (const name of named) {
      const field = document.querySelector(`#settings-fields .field[data-field="${name}"]`);
      field.classList.add("invalid");
      field.querySelector(".field-error").textContent = err.detail;
    }
    return named.size > 0;
  }

  async function saveSettings(event) {
    event.preventDefault();
    clearFieldErrors();
    const message = $("settings-message");
    const changes = {};
    for (const field of SETTINGS) {
      const value = readInput(field);
      if (!view.settings || value !== view.settings[field.name]) changes[field.name] = value;
    }
    if (!Object.keys(changes).length) {
      message.className = "muted";
      message.textContent = "nothing changed";
      return;
    }
    message.className = "muted";
    message.textContent = "saving…";
    try {
      const saved = await api("POST", "/api/queue/concurrency", changes);
      fillSettings(saved, true);
      message.className = "ok";
      message.textContent = `saved: ${Object.keys(changes).join(", ")}`;
      reloadNow();
    } catch (err) {
      if (handleAuthError(err)) return;
      const placed = showFieldErrors(err);
      message.className = "error";
      message.textContent = placed ? "not saved: see the field marked above" : `not saved: ${err.detail}`;
    }
  }

  // ------------------------------------------------------------------ actions

  let pendingAction = null;

  function openAction(action, entry) {
    const dialog = $("action-dialog");
    const input = $("action-input");
    const extra = $("action-extra");
    $("action-error").textContent = "";
    $("action-input-label").hidden = true;
    extra.hidden = true;
    input.value = "";
    const job = entry.job_id;
    const texts = {
      cancel: [`Cancel job ${job}?`, entry.status === "running"
        ? "Its processes get SIGTERM, then SIGKILL after the grace period." : `It is ${entry.status}; it will not run.`, "Cancel job"],
      approve: [`Approve job ${job}?`, "It becomes pending and is scheduled like any other job.", "Approve"],
      reject: [`Reject job ${job}?`, "The reason is recorded as the job's error message.", "Reject"],
      priority: [`Priority of job ${job}`, `Base priority ${entry.priority}; effective now ${entry.effective_priority}.`, "Set override"],
    };
    const [title, text, confirm] = texts[action];
    $("action-title").textContent = title;
    $("action-text").textContent = text;
    $("action-confirm").textContent = confirm;
    $("action-confirm").className = action === "cancel" || action === "reject" ? "danger" : "";
    if (action === "reject") {
      $("action-input-label").hidden = false;
      $("action-input-caption").textContent = "Reason";
      input.inputMode = "text";
      input.placeholder = "why it may not run";
    }
    if (action === "priority") {
      $("action-input-label").hidden = false;
      $("action-input-caption").textContent = "Override (0–100)";
      input.inputMode = "numeric";
      input.placeholder = "0–100";
      input.value = entry.priority_override ?? "";
      extra.hidden = entry.priority_override === null || entry.priority_override === undefined;
      extra.textContent = "Remove override";
    }
    pendingAction = { action, jobId: job };
    dialog.showModal();
    if (!$("action-input-label").hidden) input.focus();
  }

  async function runAction(remove) {
    if (!pendingAction) return;
    const { action, jobId } = pendingAction;
    const confirmButton = $("action-confirm");
    confirmButton.disabled = true;
    $("action-error").textContent = "";
    try {
      let done;
      if (action === "cancel") {
        const answer = await api("POST", jobPath(jobId, "cancel"));
        done = `job ${jobId} ${answer.status}`;
      } else if (action === "approve") {
        const answer = await api("POST", jobPath(jobId, "approve"));
        done = `job ${jobId} approved: ${answer.status}`;
      } else if (action === "reject") {
        const reason = $("action-input").value.trim();
        const query = reason ? `?reason=${encodeURIComponent(reason)}` : "";
        await api("POST", jobPath(jobId, "reject") + query);
        done = `job ${jobId} rejected`;
      } else if (action === "priority") {
        const text = $("action-input").value.trim();
        const priority = remove || text === "" ? null : /^[+-]?\d+$/.test(text) ? Number(text) : text;
        const answer = await api("POST", jobPath(jobId, "priority"), { priority });
        done = answer.priority_override === null
          ? `job ${jobId}: override removed`
          : `job ${jobId}: priority ${answer.priority_override}`;
      }
      pendingAction = null;
      $("action-dialog").close();
      notice(done, "ok");
      reloadNow();
    } catch (err) {
      if (handleAuthError(err)) { $("action-dialog").close(); return; }
      $("action-error").textContent = err.detail;
    } finally {
      confirmButton.disabled = false;
    }
  }

  async function showDetail() {
    const { kind, jobId } = view.detail;
    const body = $("detail-body");
    try {
      if (kind === "logs") {
        $("detail-title").textContent = `Output of ${jobId} (last ${LOG_TAIL} lines)`;
        const text = await api("GET", jobPath(jobId, "logs") + `?tail=${LOG_TAIL}`);
        body.replaceChildren(el("pre", { class: "log", text: text || "(no output yet)" }));
      } else {
        $("detail-title").textContent = `Why is ${jobId} waiting?`;
        const why = await api("GET", jobPath(jobId, "explain"));
        const items = why.reasons.map((reason) => el("li", {},
          el("code", { text: reason.code }), " ", reason.detail));
        body.replaceChildren(
          el("p", { text: `Status ${why.status}` + (why.position ? ` · position ${why.position}` : "") }),
          items.length ? el("ul", { class: "reasons" }, ...items) : el("p", { text: "Nothing holds it back." }));
      }
    } catch (err) {
      if (handleAuthError(err)) return;
      body.replaceChildren(el("p", { class: "error", text: err.detail }));
    }
  }

  function openDetail(kind, jobId) {
    view.detail = { kind, jobId };
    $("detail-body").replaceChildren(el("p", { class: "muted", text: "loading…" }));
    $("detail-dialog").showModal();
    showDetail();
  }

  function onRowAction(event) {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    const entry = view.entries.get(button.dataset.jobId);
    if (!entry) return;
    const action = button.dataset.action;
    if (action === "logs" || action === "explain") openDetail(action, entry.job_id);
    else openAction(action, entry);
  }

  let noticeTimer = null;
  function notice(text, kind) {
    const node = $("notice");
    node.textContent = text;
    node.className = `notice ${kind || ""}`;
    node.hidden = false;
    clearTimeout(noticeTimer);
    noticeTimer = setTimeout(() => { node.hidden = true; }, 6000);
  }

  // ------------------------------------------------------------------ loading and polling

  function queuePath() {
    const params = new URLSearchParams({ limit: String(LIST_LIMIT) });
    const status = $("filter-status").value;
    if (status === "all") params.set("include_completed", "true");
    else if (status) params.set("status", status);
    const user = $("filter-user").value;
    if (user === "me" && view.me) params.set("user_id", String(view.me.user_id));
    else if (user && user !== "me" && seesAll()) params.set("user_id", user);
    return `/api/queue?${params}`;
  }

  async function refresh(seq) {
    const me = await api("GET", "/api/whoami");
    view.me = me;
    const admin = me.level === "admin";
    const [stats, listing, system, settings, users] = await Promise.all([
      api("GET", "/api/queue/stats"),
      api("GET", queuePath()),
      api("GET", "/api/system/status?include_allocation=true"),
      admin ? api("GET", "/api/queue/concurrency") : null,
      admin && !me.single_user_mode ? api("GET", "/api/users") : null,
    ]);
    view.skewMs = system.timestamp * 1000 - Date.now();
    view.users = new Map((users ? users.users : []).map((user) => [user.user_id, user.name]));
    showSignedIn();
    renderWho();
    renderFigures(stats);
    renderQueue(listing);
    renderUserFilter();
    renderGpus(system);
    $("settings").hidden = !admin;
    if (settings) fillSettings(settings, false);
    view.lastFull = Date.now();
    if (seq !== undefined) view.seq = seq;
    document.body.dataset.seq = String(view.seq);
  }

  function setLive(ok, text) {
    const live = $("live");
    live.dataset.state = ok ? "live" : "down";
    live.textContent = ok ? `live · ${new Date().toLocaleTimeString()}` : text;
  }

  function showSignedIn() {
    $("main").hidden = false;
    $("auth").hidden = true;
    $("sign-out").hidden = view.me.single_user_mode;
    $("auth-message").textContent = "";
  }

  function showSignIn(detail) {
    view.me = null;
    view.users = new Map();
    view.seenUsers.clear();
    $("filter-user").value = "";
    view.seq = null;
    $("main").hidden = true;
    $("who").hidden = true;
    $("auth").hidden = false;
    $("sign-out").hidden = true;
    $("auth-message").textContent = token() ? `token not accepted: ${detail}` : "this server needs a token";
    document.body.dataset.level = "";
    document.body.dataset.seq = "";
  }

  function handleAuthError(err) {
    if (err.status === 401) {
      showSignIn(err.detail);
      setLive(false, "sign in");
      return true;
    }
    return false;
  }

  async function tick() {
    view.polling = true;
    try {
      const changes = await api("GET", "/api/panel/changes");
      if (!view.me || view.stale || changes.seq !== view.seq || Date.now() - view.lastFull > FULL_REFRESH_MS) {
        view.stale = false; // a filter or token change during this refresh sets it again
        await refresh(changes.seq);
      }
      setLive(true);
      if (view.detail && $("detail-dialog").open && view.detail.kind === "logs") showDetail();
    } catch (err) {
      if (!handleAuthError(err)) setLive(false, `offline: ${err.detail} · retrying`);
    } finally {
      view.polling = false;
    }
    if (view.me) renderClocks();
    schedule(view.stale ? 0 : undefined);
  }

  function schedule(delay) {
    clearTimeout(view.timer);
    view.timer = setTimeout(tick, delay ?? (document.hidden ? HIDDEN_POLL_MS : POLL_MS));
  }

  // The filters or the token changed: reload at once (or right after a reload in flight).
  function reloadNow() {
    view.stale = true;
    if (!view.polling) schedule(0);
  }

  // ------------------------------------------------------------------ wiring

  function start() {
    buildSettingsForm();
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const value = $("token-input").value.trim();
      if (value) sessionStorage.setItem(TOKEN_KEY, value);
      $("token-input").value = "";
      reloadNow();
    });
    const forget = () => {
      sessionStorage.removeItem(TOKEN_KEY);
      $("token-input").value = "";
      reloadNow();
    };
    $("token-forget").addEventListener("click", forget);
    $("sign-out").addEventListener("click", forget);
    $("queue-rows").addEventListener("click", onRowAction);
    $("filter-status").addEventListener("change", reloadNow);
    $("filter-user").addEventListener("change", reloadNow);
    $("settings-form").addEventListener("submit", saveSettings);
    $("settings-reset").addEventListener("click", () => {
      clearFieldErrors();
      $("settings-message").textContent = "";
      if (view.settings) fillSettings(view.settings, true);
    });
    $("action-form").addEventListener("submit", (event) => { event.preventDefault(); runAction(false); });
    $("action-extra").addEventListener("click", () => runAction(true));
    $("action-close").addEventListener("click", () => { pendingAction = null; $("action-dialog").close(); });
    $("detail-close").addEventListener("click", () => { view.detail = null; $("detail-dialog").close(); });
    $("detail-refresh").addEventListener("click", showDetail);
    document.addEventListener("visibilitychange", () => { if (!document.hidden && !view.polling) schedule(0); });
    tick();
  }

  document.addEventListener("DOMContentLoaded", start);
})();
