// The Tasker dashboard: a task list and a task view that follow the server live over
// GraphQL subscriptions (graphql-transport-ws), resume from their last cursor after a drop
// (no duplicate, no gap), and fall back to polling the event log when WebSockets are blocked.
// Plain JavaScript, no build step: the server embeds this file as it is.
"use strict";

// ---------------------------------------------------------------------------------------------
// Small helpers

const $ = (selector, root = document) => root.querySelector(selector);

/** Text made safe for HTML. */
function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function shortId(id) {
  return String(id).slice(-8);
}

function duration(ms) {
  if (ms == null) return "";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
  const seconds = Math.round(ms / 1000);
  return `${Math.floor(seconds / 60)} min ${seconds % 60} s`;
}

function time(iso) {
  return iso ? new Date(iso).toLocaleTimeString() : "";
}

function toast(message, isError = false) {
  const node = document.createElement("div");
  node.className = "toast" + (isError ? " error" : "");
  node.textContent = message;
  $("#toasts").append(node);
  setTimeout(() => node.remove(), isError ? 8000 : 4000);
}

/** What the page measured, read by the browser test and shown to curious people. */
const metrics = { loadMs: null, renderMs: null, updates: [], received: 0, live: 0 };
window.taskerMetrics = metrics;

// ---------------------------------------------------------------------------------------------
// Authentication: a bearer token entered once, kept in this tab's session storage.

const TOKEN_KEY = "tasker.token";
const auth = {
  get token() {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  },
  set token(value) {
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    else sessionStorage.removeItem(TOKEN_KEY);
  },
  header() {
    return this.token ? "Bearer " + this.token : null;
  },
};

let askingToken = null;
/** Asks for a token (once at a time); resolves when one was entered. */
function askToken(reason) {
  if (askingToken) return askingToken;
  const dialog = $("#token-dialog");
  $("#token-reason").textContent = reason || "This server requires a token. It is kept in this tab's session storage only.";
  $("#token-input").value = "";
  dialog.returnValue = "";
  askingToken = new Promise((resolve) => {
    dialog.addEventListener("close", function done() {
      dialog.removeEventListener("close", done);
      askingToken = null;
      if (dialog.returnValue === "save" && $("#token-input").value.trim()) {
        auth.token = $("#token-input").value.trim();
        live.restart();
        resolve(true);
        start();
      } else {
        resolve(false);
      }
    });
  });
  dialog.showModal();
  return askingToken;
}

// ---------------------------------------------------------------------------------------------
// GraphQL over HTTP

class GraphQLError extends Error {
  constructor(message, code) {
    super(message);
    this.code = code;
  }
}

async function gql(query, variables = {}) {
  const headers = { "content-type": "application/json", accept: "application/graphql-response+json, application/json" };
  if (auth.header()) headers.authorization = auth.header();
  const response = await fetch("/graphql", { method: "POST", headers, body: JSON.stringify({ query, variables }) });
  let body;
  try {
    body = await response.json();
  } catch {
    throw new GraphQLError(`the server answered ${response.status}`, `HTTP_${response.status}`);
  }
  if (body.errors && body.errors.length) {
    const first = body.errors[0];
    const code = first.extensions && first.extensions.code;
    if (code === "UNAUTHENTICATED") askToken(first.message);
    throw new GraphQLError(first.message, code);
  }
  return body.data;
}

// ---------------------------------------------------------------------------------------------
// Live updates: one WebSocket for every subscription of the page, resumed from each
// subscription's cursor after a drop; polling of the event log when WebSockets fail.

const params = new URLSearchParams(location.search);

class Live {
  constructor() {
    this.subscriptions = new Set();
    this.byId = new Map();
    this.nextId = 1;
    this.socket = null;
    this.failures = 0;
    this.mode = params.get("transport") === "poll" ? "poll" : "ws";
    this.pollTimer = null;
    this.retryTimer = null;
    this.open();
  }

  setState(state) {
    const node = $("#connection");
    node.dataset.state = state;
    node.textContent = state;
  }

  open() {
    clearTimeout(this.retryTimer);
    if (this.mode === "poll") {
      this.startPolling();
      return;
    }
    this.setState(this.failures ? "reconnecting" : "connecting");
    const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/graphql";
    let socket;
    try {
      socket = new WebSocket(url, "graphql-transport-ws");
    } catch {
      this.closed(null, false, {});
      return;
    }
    this.socket = socket;
    this.acknowledged = false;
    socket.onopen = () => {
      const payload = auth.header() ? { authorization: auth.header() } : {};
      socket.send(JSON.stringify({ type: "connection_init", payload }));
    };
    socket.onmessage = (message) => {
      let data;
      try {
        data = JSON.parse(message.data);
      } catch {
        return;
      }
      switch (data.type) {
        case "connection_ack":
          this.acknowledged = true;
          this.failures = 0;
          this.stopPolling();
          this.setState("live");
          for (const subscription of this.subscriptions) this.start(subscription);
          break;
        case "ping":
          socket.send(JSON.stringify({ type: "pong" }));
          break;
        case "next": {
          const subscription = this.byId.get(data.id);
          if (!subscription) break;
          if (data.payload.errors && data.payload.errors.length) subscription.onError(data.payload.errors[0]);
          else subscription.onNext(data.payload.data);
          break;
        }
        case "error":
        case "complete": {
          // Either way the server is done with it.
          const subscription = this.byId.get(data.id);
          if (!subscription) break;
          this.byId.delete(data.id);
          this.subscriptions.delete(subscription);
          if (data.type === "error") subscription.onError(data.payload[0] || { message: "subscription refused" });
          else subscription.onComplete();
          break;
        }
      }
    };
    socket.onclose = (event) => this.closed(socket, this.acknowledged, event);
  }

  closed(socket, acknowledged, event) {
    if (socket && this.socket !== socket) return;
    this.socket = null;
    this.byId.clear();
    if (event.code === 4401 || event.code === 4403) {
      this.setState("offline");
      askToken("The server refused the live connection: enter a valid token.");
      return;
    }
    if (!acknowledged) this.failures += 1;
    if (this.failures >= 3) {
      // WebSockets look blocked (a proxy, a policy): poll the log, try again later.
      this.mode = "poll";
      this.startPolling();
      this.retryTimer = setTimeout(() => {
        this.mode = "ws";
        this.failures = 0;
        this.open();
      }, 30000);
      return;
    }
    this.setState("reconnecting");
    this.retryTimer = setTimeout(() => this.open(), Math.min(250 * 2 ** this.failures, 4000));
  }

  /** Sends the subscription, resuming after its cursor. */
  start(subscription) {
    // Before the server acknowledged the connection, the acknowledgement starts it.
    if (!this.socket || !this.acknowledged) return;
    const id = String(this.nextId++);
    subscription.id = id;
    this.byId.set(id, subscription);
    const { query, variables } = subscription.operation();
    this.socket.send(JSON.stringify({ type: "subscribe", id, payload: { query, variables } }));
  }

  /**
   * Follows `spec`: `operation()` gives the query and variables (with the cursor to resume
   * after), `onNext`/`onComplete`/`onError` receive the stream, `poll()` catches up over HTTP.
   */
  subscribe(spec) {
    const subscription = {
      onComplete() {},
      onError(error) {
        toast(error.message, true);
      },
      ...spec,
    };
    this.subscriptions.add(subscription);
    // While polling, the next round picks it up.
    if (this.mode === "ws") this.start(subscription);
    return {
      close: () => {
        this.subscriptions.delete(subscription);
        if (subscription.id && this.byId.get(subscription.id) === subscription) {
          this.byId.delete(subscription.id);
          if (this.socket && this.socket.readyState === WebSocket.OPEN) {
            this.socket.send(JSON.stringify({ type: "complete", id: subscription.id }));
          }
        }
      },
    };
  }

  /** Rounds of polling, 2 s apart, one at a time, until WebSockets work again. */
  startPolling() {
    if (this.pollTimer) return;
    this.setState("polling");
    const round = async () => {
      let failed = false;
      for (const subscription of [...this.subscriptions]) {
        try {
          await subscription.poll();
        } catch {
          failed = true;
        }
      }
      if (this.mode !== "poll") {
        this.pollTimer = null;
        return;
      }
      this.setState(failed ? "offline" : "polling");
      this.pollTimer = setTimeout(round, 2000);
    };
    this.pollTimer = setTimeout(round, 0);
  }

  stopPolling() {
    clearTimeout(this.pollTimer);
    this.pollTimer = null;
  }

  /** A new token: start over with it. */
  restart() {
    if (this.socket) {
      const socket = this.socket;
      this.socket = null;
      socket.close();
    }
    this.byId.clear();
    this.failures = 0;
    if (this.mode === "ws") this.open();
  }
}

const live = new Live();

// ---------------------------------------------------------------------------------------------
// Who the caller is: only the actions its token permits are offered.

let viewer = null;
/** Each action: the permission it needs and what a person calls it. */
const ACTIONS = {
  cancelTask: ["tasker.task:cancel", "Cancel task"],
  retryTask: ["tasker.task:retry", "Retry task"],
  resolveTask: ["tasker.task:update", "Resolve task by hand"],
  retryStep: ["tasker.workflow_step:retry", "Retry step"],
  rerunFromStep: ["tasker.workflow_step:retry", "Re-run from here"],
  resolveStepManually: ["tasker.workflow_step:resolve", "Resolve step by hand"],
  skipStep: ["tasker.workflow_step:update", "Skip"],
  approveStep: ["tasker.workflow_step:update", "Approve"],
  rejectStep: ["tasker.workflow_step:update", "Reject"],
};

/** Whether the token permits `action` (until the server said, every action is offered). */
function may(action) {
  return !viewer || viewer.permissions.includes(ACTIONS[action][0]);
}

/** A button for `action`; disabled while one of its requests runs. */
function actionButton(action, cls, busy) {
  return `<button class="${cls}" data-action="${action}" ${busy.has(action) ? "disabled" : ""}>${esc(ACTIONS[action][1])}</button>`;
}

async function loadViewer() {
  const data = await gql("{ viewer { subject permissions } }");
  viewer = data.viewer;
  $("#viewer").textContent = viewer.subject ? viewer.subject : "";
}

// ---------------------------------------------------------------------------------------------
// Routing

let current = null; // the view on screen: { close() }

function route() {
  if (current) current.close();
  closeDrawer();
  const hash = location.hash.replace(/^#/, "") || "/";
  const match = hash.match(/^\/task\/([0-9a-fA-F-]{36})/);
  current = match ? taskView(match[1]) : listView(new URLSearchParams(hash.split("?")[1] || ""));
}

window.addEventListener("hashchange", route);

// ---------------------------------------------------------------------------------------------
// The task list

const TASK_ROW = "id namespace templateName templateVersion state createdAt completedAt completionPercentage tags";
const TASK_EVENT_NAMES = ["task.created", "task.started", "task.completed", "task.failed", "task.retry_requested", "task.cancelled", "task.resolved_manually"];

function listView(query) {
  const filter = {
    namespace: query.get("namespace") || null,
    template: query.get("template") || null,
    state: query.get("state") || null,
    tag: query.get("tag") || null,
  };
  const after = query.get("after");
  const view = $("#view");
  view.innerHTML = `
    <section class="panel">
      <form class="filters" id="filters">
        <label>Namespace <select name="namespace"><option value="">any</option></select></label>
        <label>Template <input name="template" value="${esc(filter.template || "")}" placeholder="any"></label>
        <label>State <select name="state"><option value="">any</option>${STATES
          .map((s) => `<option ${filter.state === s ? "selected" : ""}>${s}</option>`)
          .join("")}</select></label>
        <label>Tag <input name="tag" value="${esc(filter.tag || "")}" placeholder="any"></label>
        <button class="primary" type="submit">Filter</button>
        <span class="spacer"></span><span id="total" class="muted"></span>
      </form>
    </section>
    <section class="panel">
      <table id="tasks"><thead><tr><th>Task</th><th>Template</th><th>State</th><th>Progress</th><th>Created</th><th>Tags</th></tr></thead><tbody></tbody></table>
      <p class="actions"><a id="first-page" href="#/">First page</a> <a id="next-page" hidden>Next page</a></p>
    </section>`;
  $("#filters").addEventListener("submit", (event) => {
    event.preventDefault();
    const form = new FormData(event.target);
    const next = new URLSearchParams();
    for (const [key, value] of form) if (value) next.set(key, value);
    location.hash = "#/?" + next;
  });
  const firstPage = new URLSearchParams(query);
  firstPage.delete("after");
  $("#first-page").href = "#/?" + firstPage;
  let closed = false;
  let handle = null;
  let cursor = null;
  const rows = new Map();

  const taskFilter = () => ({
    namespace: filter.namespace,
    template: filter.template,
    states: filter.state ? [filter.state] : null,
    tags: filter.tag ? [filter.tag] : null,
  });

  function rowHtml(task) {
    const percent = Math.round(task.completionPercentage || 0);
    return `<td><a href="#/task/${esc(task.id)}">${esc(shortId(task.id))}</a></td>
      <td>${esc(task.namespace)}/${esc(task.templateName)}@${esc(task.templateVersion)}</td>
      <td><span class="state" data-state="${esc(task.state)}">${esc(task.state)}</span></td>
      <td><div class="progress"><div style="width:${percent}%"></div></div></td>
      <td>${esc(time(task.createdAt))}</td><td>${esc((task.tags || []).join(", "))}</td>`;
  }

  function put(task, atTop) {
    let row = rows.get(task.id);
    if (!row) {
      row = document.createElement("tr");
      row.dataset.taskId = task.id;
      rows.set(task.id, row);
      const body = $("#tasks tbody");
      if (atTop) body.prepend(row);
      else body.append(row);
      if (atTop) row.classList.add("flash");
    }
    row.dataset.state = task.state;
    row.innerHTML = rowHtml(task);
  }

  function apply(update) {
    cursor = update.cursor;
    const task = update.task;
    if (rows.has(task.id)) put(task, false);
    else if (update.event.name === "task.created" && !after && (!filter.state || filter.state === task.state)) put(task, true);
  }

  async function load() {
    // The head first, then the page: whatever commits in between comes again as an update.
    const head = await gql("{ eventHead }");
    const data = await gql(
      `query($f: TaskFilterInput, $a: String) { namespaces { name }
         tasks(filter: $f, first: 25, after: $a) { totalCount pageInfo { hasNextPage endCursor } edges { node { ${TASK_ROW} } } } }`,
      { f: taskFilter(), a: after },
    );
    if (closed) return;
    const select = $("#filters select[name=namespace]");
    for (const ns of data.namespaces) {
      const option = document.createElement("option");
      option.textContent = ns.name;
      option.selected = ns.name === filter.namespace;
      select.append(option);
    }
    $("#total").textContent = `${data.tasks.totalCount} tasks`;
    for (const edge of data.tasks.edges) put(edge.node, false);
    if (data.tasks.pageInfo.hasNextPage) {
      const next = new URLSearchParams(query);
      next.set("after", data.tasks.pageInfo.endCursor);
      $("#next-page").href = "#/?" + next;
      $("#next-page").hidden = false;
    }
    cursor = head.eventHead;
    handle = live.subscribe({
      operation: () => ({
        query: `subscription($f: TaskStreamFilterInput, $a: String) { tasksUpdated(filter: $f, after: $a) { cursor event { name } task { ${TASK_ROW} } } }`,
        variables: { f: { namespace: filter.namespace, template: filter.template, tags: filter.tag ? [filter.tag] : null }, a: cursor },
      }),
      onNext: (data) => apply(data.tasksUpdated),
      poll: async () => {
        const page = await gql(
          `query($f: EventFilterInput, $a: String) { events(filter: $f, after: $a, first: 200) { edges { cursor node { name taskId } } } }`,
          { f: { names: TASK_EVENT_NAMES, namespaces: filter.namespace ? [filter.namespace] : null }, a: cursor },
        );
        const edges = page.events.edges;
        if (!edges.length) return;
        const ids = [...new Set(edges.map((e) => e.node.taskId))];
        const tasks = await Promise.all(ids.map((id) => gql(`query($id: ID!) { task(id: $id) { ${TASK_ROW} } }`, { id }).then((d) => d.task).catch(() => null)));
        const byId = new Map(tasks.filter(Boolean).map((t) => [t.id, t]));
        for (const edge of edges) {
          const task = byId.get(edge.node.taskId);
          if (task && (!filter.template || task.templateName === filter.template) && (!filter.tag || task.tags.includes(filter.tag))) {
            apply({ cursor: edge.cursor, event: edge.node, task });
          }
          cursor = edge.cursor;
        }
      },
    });
  }

  load().catch((error) => toast(error.message, true));
  return {
    close() {
      closed = true;
      if (handle) handle.close();
    },
  };
}

// ---------------------------------------------------------------------------------------------
// The task view: header with actions, the DAG, the timeline of attempts, the event stream.

const STATES = ["PENDING", "IN_PROGRESS", "COMPLETE", "ERROR", "CANCELLED", "RESOLVED_MANUALLY"];
const STEP_FIELDS = "id name handler state attempts maxAttempts retryable skippable startedAt completedAt durationMs lastError leaseHolder leaseExpiresAt nextAttemptAt results";
const GRAPH_FIELDS = "graph { nodes { stepId level } topologicalOrder criticalPath { stepIds totalSeconds estimated } bottlenecks { stepId blockedSteps } parallelism }";
const TASK_QUERY = `query($id: ID!) { task(id: $id) {
  id namespace templateName templateVersion state createdAt completedAt completionPercentage context tags correlationId
  steps { ${STEP_FIELDS} }
  edges { parentId childId }
  ${GRAPH_FIELDS}
  events { cursor name stepId occurredAt payload }
} }`;
// What a live update does not carry (critical path, bottlenecks), re-read at most every 2 s.
const INSIGHT_QUERY = `query($id: ID!) { task(id: $id) { state completionPercentage completedAt ${GRAPH_FIELDS} } }`;
const NODE_W = 170;
const NODE_H = 42;
const COL = 210;
const ROW = 54;
const ENDED = ["COMPLETE", "ERROR", "CANCELLED", "RESOLVED_MANUALLY"];
const FINISHED = ["COMPLETE", "CANCELLED", "RESOLVED_MANUALLY"];

function taskView(taskId) {
  const view = $("#view");
  view.innerHTML = `<p class="muted">Loading task…</p>`;
  let closed = false;
  let handle = null;
  let ended = false;
  let cursor = null;
  let task = null;
  const steps = new Map(); // id -> step
  const nodes = new Map(); // id -> svg group
  const seen = new Set(); // event cursors shown
  const history = new Map(); // step id -> its state changes, from the events: { toState, at, error }
  let refreshTimer = null;
  let ganttTimer = null;
  const busy = new Set(); // actions whose request runs

  function header() {
    const percent = Math.round(task.completionPercentage || 0);
    const running = task.completedAt ? new Date(task.completedAt) - new Date(task.createdAt) : Date.now() - new Date(task.createdAt);
    const buttons = [];
    if (!FINISHED.includes(task.state) && may("cancelTask")) buttons.push(actionButton("cancelTask", "danger", busy));
    if (task.state === "ERROR" && may("retryTask")) buttons.push(actionButton("retryTask", "primary", busy));
    if (task.state === "ERROR" && may("resolveTask")) buttons.push(actionButton("resolveTask", "", busy));
    $("#task-head").innerHTML = `
      <h1>${esc(task.namespace)}/${esc(task.templateName)}@${esc(task.templateVersion)}</h1>
      <span class="state" id="task-state" data-state="${esc(task.state)}">${esc(task.state)}</span>
      <div class="progress" style="width:160px"><div style="width:${percent}%"></div></div><span>${percent}%</span>
      <span class="muted">created ${esc(time(task.createdAt))} · ${esc(duration(running))}</span>
      <span class="spacer"></span><span class="actions">${buttons.join(" ")}</span>`;
  }

  function drawGraph() {
    const levels = new Map();
    const place = new Map();
    for (const node of task.graph.nodes) {
      const column = levels.get(node.level) || [];
      column.push(node.stepId);
      levels.set(node.level, column);
      place.set(node.stepId, { x: 16 + node.level * COL, y: 16 + (column.length - 1) * ROW });
    }
    const critical = new Set(task.graph.criticalPath.stepIds);
    const criticalEdges = new Set();
    const path = task.graph.criticalPath.stepIds;
    for (let i = 1; i < path.length; i++) criticalEdges.add(path[i - 1] + ">" + path[i]);
    const blocked = new Map(task.graph.bottlenecks.map((b) => [b.stepId, b.blockedSteps]));
    const width = 32 + levels.size * COL;
    const height = 32 + Math.max(1, ...[...levels.values()].map((c) => c.length)) * ROW;
    const parts = [`<svg id="dag" width="${width}" height="${height}" xmlns="http://www.w3.org/2000/svg">`];
    for (const edge of task.edges) {
      const from = place.get(edge.parentId);
      const to = place.get(edge.childId);
      if (!from || !to) continue;
      const x1 = from.x + NODE_W, y1 = from.y + NODE_H / 2, x2 = to.x, y2 = to.y + NODE_H / 2, mid = (x1 + x2) / 2;
      const cls = criticalEdges.has(edge.parentId + ">" + edge.childId) ? "edge critical" : "edge";
      parts.push(`<path class="${cls}" d="M${x1},${y1} C${mid},${y1} ${mid},${y2} ${x2},${y2}"/>`);
    }
    for (const [id, at] of place) {
      const step = steps.get(id);
      const badge = blocked.has(id) ? `<text class="badge" x="${NODE_W - 6}" y="13" text-anchor="end">blocks ${blocked.get(id)}</text>` : "";
      parts.push(`<g class="node${critical.has(id) ? " critical" : ""}" data-step-id="${esc(id)}" data-name="${esc(step.name)}" data-state="${esc(step.state)}" transform="translate(${at.x},${at.y})">
        <title>${esc(step.name)} (${esc(step.handler)})</title>
        <rect width="${NODE_W}" height="${NODE_H}"></rect>
        <text x="8" y="17">${esc(step.name.length > 22 ? step.name.slice(0, 21) + "…" : step.name)}</text>
        <text class="sub" x="8" y="33">${esc(nodeSubtitle(step))}</text>${badge}</g>`);
    }
    parts.push("</svg>");
    $("#graph").innerHTML = parts.join("");
    const path_ = task.graph.criticalPath;
    $("#graph-legend").textContent = `critical path in orange (${duration(Math.round(path_.totalSeconds * 1000))}${path_.estimated ? ", estimated" : ""}) · parallelism ${task.graph.parallelism} · ${task.graph.nodes.length} steps`;
    nodes.clear();
    for (const group of $("#graph").querySelectorAll("g.node")) nodes.set(group.dataset.stepId, group);
  }

  /** The line under a node's name: state, duration, which try. */
  function nodeSubtitle(step) {
    const tries = step.attempts > 1 ? ` · try ${step.attempts}/${step.maxAttempts}` : "";
    return `${step.state.toLowerCase().replace("_", " ")}${step.durationMs != null ? " · " + duration(step.durationMs) : ""}${tries}`;
  }

  function updateNode(step) {
    const group = nodes.get(step.id);
    if (!group) return;
    group.dataset.state = step.state;
    const sub = group.querySelector("text.sub");
    if (sub) sub.textContent = nodeSubtitle(step);
  }

  /** Attempts from a step's state changes: [start, end, outcome]; an open one ends now. */
  function attempts(step) {
    const list = [];
    let open = null;
    for (const t of history.get(step.id) || []) {
      const at = t.at;
      if (open) {
        list.push({ start: open, end: at, outcome: t.toState });
        open = null;
      }
      if (t.toState === "IN_PROGRESS") open = at;
    }
    if (open) list.push({ start: open, end: Date.now(), outcome: "IN_PROGRESS" });
    return list;
  }

  function drawGantt() {
    const start = new Date(task.createdAt).getTime();
    const end = task.completedAt ? new Date(task.completedAt).getTime() : Date.now();
    const span = Math.max(end - start, 1000);
    const label = 170;
    const width = 800;
    const scale = (ms) => label + ((ms - start) / span) * (width - label - 50);
    const order = task.graph.topologicalOrder;
    const parents = new Map();
    for (const edge of task.edges) {
      const list = parents.get(edge.childId) || [];
      list.push(edge.parentId);
      parents.set(edge.childId, list);
    }
    const parts = [`<svg class="gantt" width="${width}" height="${24 + order.length * 18}" xmlns="http://www.w3.org/2000/svg">`];
    for (let s = 0; s <= 4; s++) {
      const x = label + (s / 4) * (width - label - 50);
      parts.push(`<line class="axis" x1="${x}" y1="0" x2="${x}" y2="${24 + order.length * 18}"/><text x="${x + 2}" y="12" class="muted">${duration(Math.round((s / 4) * span))}</text>`);
    }
    order.forEach((id, row) => {
      const step = steps.get(id);
      if (!step) return;
      const y = 20 + row * 18;
      parts.push(`<g data-step-id="${esc(id)}"><text class="row-label" x="4" y="${y + 11}">${esc(step.name.slice(0, 24))}</text>`);
      const tries = attempts(step);
      // Waiting: from when its parents were all done (or the task began) to its first start.
      const ready = Math.max(start, ...(parents.get(id) || []).map((p) => (steps.get(p) && steps.get(p).completedAt ? new Date(steps.get(p).completedAt).getTime() : start)));
      const firstStart = tries.length ? tries[0].start : step.state === "PENDING" && ready > start ? Date.now() : null;
      if (firstStart && firstStart > ready) parts.push(`<rect class="wait" x="${scale(ready)}" y="${y + 2}" width="${Math.max(1, scale(firstStart) - scale(ready))}" height="12"><title>waited ${duration(firstStart - ready)}</title></rect>`);
      tries.forEach((attempt, n) => {
        parts.push(`<rect class="attempt ${esc(attempt.outcome)}" x="${scale(attempt.start)}" y="${y + 2}" width="${Math.max(2, scale(attempt.end) - scale(attempt.start))}" height="12"><title>${esc(step.name)} attempt ${n + 1}: ${esc(attempt.outcome.toLowerCase())} after ${duration(attempt.end - attempt.start)}</title></rect>`);
      });
      parts.push("</g>");
    });
    parts.push("</svg>");
    $("#gantt").innerHTML = parts.join("");
  }

  function scheduleGantt() {
    if (ganttTimer) return;
    ganttTimer = setTimeout(() => {
      ganttTimer = null;
      if (!closed) drawGantt();
    }, 500);
  }

  function addEvents(events, initial) {
    const list = $("#events");
    const fresh = [];
    metrics.received += events.length;
    for (const event of events) {
      if (seen.has(event.cursor)) continue;
      seen.add(event.cursor);
      fresh.push(event);
      const payload = event.payload || {};
      if (event.stepId && payload.to_state) {
        const list = history.get(event.stepId) || [];
        list.push({ toState: payload.to_state, fromState: payload.from_state, at: new Date(event.occurredAt).getTime(), error: payload.error });
        history.set(event.stepId, list);
      }
    }
    const html = fresh
      .map((e) => `<li data-cursor="${esc(e.cursor)}" data-name="${esc(e.name)}">${esc(time(e.occurredAt))} <b>${esc(e.name)}</b> ${esc(e.payload && e.payload.step ? e.payload.step : "")}</li>`)
      .reverse()
      .join("");
    list.insertAdjacentHTML("afterbegin", html);
    while (list.children.length > 500) list.lastElementChild.remove();
    if (!initial) $("#event-count").textContent = `${seen.size} events`;
  }

  /** Re-reads what an update does not carry (critical path, bottlenecks), at most every 2 s. */
  function scheduleRefresh() {
    if (refreshTimer) return;
    refreshTimer = setTimeout(async () => {
      try {
        const data = await gql(INSIGHT_QUERY, { id: taskId });
        if (closed) return;
        Object.assign(task, data.task);
        header();
        drawGraph();
        if (selected()) openStep(selected());
      } catch (error) {
        toast(error.message, true);
      } finally {
        refreshTimer = null;
      }
    }, 2000);
  }

  function apply(update) {
    const began = performance.now();
    cursor = update.cursor;
    task.state = update.task.state;
    task.completionPercentage = update.task.completionPercentage;
    task.completedAt = update.task.completedAt;
    for (const changed of update.changedSteps) {
      const step = { ...steps.get(changed.id), ...changed };
      steps.set(changed.id, step);
      updateNode(step);
    }
    metrics.live += update.events.length;
    addEvents(update.events, false);
    header();
    const shown = selected();
    if (shown && update.changedSteps.some((s) => s.id === shown)) openStep(shown);
    if (update.last) ended = true;
    scheduleGantt();
    scheduleRefresh();
    metrics.updates.push(performance.now() - began);
  }

  function follow() {
    if (handle) handle.close();
    ended = false;
    handle = live.subscribe({
      operation: () => ({
        query: `subscription($id: ID!, $a: String) { taskUpdated(id: $id, after: $a) { cursor last task { state completionPercentage completedAt } changedSteps { ${STEP_FIELDS} } events { cursor name stepId occurredAt payload } } }`,
        variables: { id: taskId, a: cursor },
      }),
      onNext: (data) => apply(data.taskUpdated),
      onComplete: () => {
        ended = true;
      },
      poll: async () => {
        if (ended) return;
        const page = await gql(
          `query($f: EventFilterInput, $a: String) { events(filter: $f, after: $a, first: 500) { edges { cursor node { cursor name stepId occurredAt payload } } } }`,
          { f: { taskId }, a: cursor },
        );
        const edges = page.events.edges;
        if (!edges.length) return;
        const ids = [...new Set(edges.map((e) => e.node.stepId).filter(Boolean))];
        const data = await gql(`query($id: ID!) { task(id: $id) { state completionPercentage completedAt steps { ${STEP_FIELDS} } } }`, { id: taskId });
        apply({
          cursor: edges[edges.length - 1].cursor,
          last: false,
          task: data.task,
          changedSteps: data.task.steps.filter((s) => ids.includes(s.id)),
          events: edges.map((e) => e.node),
        });
        if (ENDED.includes(data.task.state)) ended = true;
      },
    });
  }

  /** The step the drawer shows, if it is open. */
  function selected() {
    const drawer = $("#drawer");
    return drawer.hidden ? null : drawer.dataset.stepId;
  }

  function openStep(id) {
    for (const group of nodes.values()) group.classList.toggle("selected", group.dataset.stepId === id);
    const step = steps.get(id);
    if (!step) return;
    const open = !FINISHED.includes(task.state);
    const awaiting = step.state === "IN_PROGRESS" && step.leaseHolder === "awaiting-decision";
    const offered = [
      ["approveStep", "primary", awaiting],
      ["rejectStep", "danger", awaiting],
      ["retryStep", "primary", step.state === "ERROR"],
      ["resolveStepManually", "", step.state === "ERROR"],
      ["skipStep", "", step.skippable && ["PENDING", "ERROR"].includes(step.state)],
      ["rerunFromStep", "", ["COMPLETE", "ERROR", "SKIPPED", "RESOLVED_MANUALLY"].includes(step.state)],
    ];
    const buttons = offered.filter(([action, , when]) => open && when && may(action)).map(([action, cls]) => actionButton(action, cls, busy));
    const drawer = $("#drawer");
    drawer.hidden = false;
    drawer.dataset.stepId = id;
    drawer.innerHTML = `
      <p><button type="button" id="drawer-close">Close</button></p>
      <h2>${esc(step.name)} <span class="state" data-state="${esc(step.state)}">${esc(step.state)}</span></h2>
      <div class="actions">${buttons.join(" ")}</div>
      <dl>
        <dt>Handler</dt><dd>${esc(step.handler)}</dd>
        <dt>Attempts</dt><dd>${step.attempts} of ${step.maxAttempts}${step.retryable ? "" : " (not retryable)"}</dd>
        <dt>Started</dt><dd>${esc(time(step.startedAt))}</dd>
        <dt>Finished</dt><dd>${esc(time(step.completedAt))}</dd>
        <dt>Duration</dt><dd>${esc(duration(step.durationMs))}</dd>
        <dt>Lease holder</dt><dd>${esc(awaiting ? "waiting for a person's decision" : step.leaseHolder || "")}</dd>
        <dt>Lease until</dt><dd>${esc(time(step.leaseExpiresAt))}</dd>
        <dt>Next attempt</dt><dd>${esc(time(step.nextAttemptAt))}</dd>
      </dl>
      ${step.lastError ? `<h3>Last error</h3><pre id="step-error">${esc(step.lastError)}</pre>` : ""}
      ${step.results ? `<h3>Results</h3><pre>${esc(JSON.stringify(step.results, null, 2))}</pre>` : ""}
      <h3>Transitions</h3>
      <ol>${(history.get(step.id) || []).map((t) => `<li>${esc(new Date(t.at).toLocaleTimeString())} ${esc(t.fromState || "·")} → ${esc(t.toState)} ${esc(t.error || "")}</li>`).join("")}</ol>`;
    $("#drawer-close").addEventListener("click", closeDrawer);
    for (const button of drawer.querySelectorAll("button[data-action]")) {
      button.addEventListener("click", () => {
        const action = button.dataset.action;
        const input = { id: step.id };
        if (action === "rejectStep") {
          const reason = prompt("Why is it rejected?");
          if (!reason) return;
          input.reason = reason;
        }
        act(action, input);
      });
    }
  }

  /** Runs a person's action; its button stays disabled until the answer comes. */
  async function act(action, input) {
    const label = ACTIONS[action][1];
    if (action === "cancelTask" && !confirm("Cancel this task and its unfinished steps?")) return;
    const fields = action.endsWith("Task") ? "task { id state }" : action === "rerunFromStep" ? "task { id state } resetSteps { id }" : "step { id state } task { id state }";
    const redraw = () => {
      header();
      if (selected()) openStep(selected());
    };
    busy.add(action);
    redraw();
    try {
      await gql(`mutation($i: ${action[0].toUpperCase() + action.slice(1)}Input!) { ${action}(input: $i) { ${fields} } }`, { i: input });
      toast(`${label}: done`);
      // The stream ended with the task; a person's action may have reopened it.
      if (ended) follow();
      scheduleRefresh();
    } catch (error) {
      toast(`${label}: ${error.message}`, true);
    } finally {
      busy.delete(action);
      if (!closed) redraw();
    }
  }

  async function load() {
    const began = performance.now();
    let fetched = 0;
    // The head first, then the task: whatever commits in between comes again as an update.
    const head = await gql("{ eventHead }");
    const data = await gql(TASK_QUERY, { id: taskId });
    if (closed) return;
    fetched = performance.now();
    task = data.task;
    for (const step of task.steps) steps.set(step.id, step);
    cursor = head.eventHead;
    view.innerHTML = `
      <section class="panel task-head" id="task-head"></section>
      <div class="grid">
        <section class="panel"><h3>Graph <span class="muted legend" id="graph-legend"></span></h3><div class="scroll" id="graph"></div></section>
        <section class="panel"><h3>Events <span class="muted" id="event-count"></span></h3><div class="scroll"><ul id="events"></ul></div></section>
      </div>
      <section class="panel"><h3>Timeline</h3><div class="scroll" id="gantt"></div></section>`;
    $("#task-head").addEventListener("click", (event) => {
      const button = event.target.closest("button[data-action]");
      if (button) act(button.dataset.action, { id: task.id });
    });
    $("#graph").addEventListener("click", (event) => {
      const node = event.target.closest("g.node");
      if (node) openStep(node.dataset.stepId);
    });
    header();
    drawGraph();
    addEvents(data.task.events, true);
    drawGantt();
    $("#event-count").textContent = `${seen.size} events`;
    metrics.loadMs = performance.now() - began;
    metrics.renderMs = performance.now() - fetched;
    document.body.dataset.rendered = taskId;
    follow();
  }

  load().catch((error) => {
    view.innerHTML = `<p class="toast error">${esc(error.message)}</p>`;
  });
  return {
    close() {
      closed = true;
      clearTimeout(refreshTimer);
      clearTimeout(ganttTimer);
      if (handle) handle.close();
    },
  };
}

function closeDrawer() {
  const drawer = $("#drawer");
  drawer.hidden = true;
  delete drawer.dataset.stepId;
  drawer.innerHTML = "";
  for (const group of document.querySelectorAll("g.node.selected")) group.classList.remove("selected");
}

// ---------------------------------------------------------------------------------------------
// Start

/** Learns who the caller is (the actions its token permits), then shows the view. */
function start() {
  loadViewer()
    .catch(() => {})
    .finally(route);
}

$("#token-cancel").addEventListener("click", () => $("#token-dialog").close("cancel"));
$("#token-button").addEventListener("click", () => askToken("Enter a bearer token (kept in this tab's session storage only)."));
start();
