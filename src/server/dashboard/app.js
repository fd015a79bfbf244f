/* zse dashboard: a chat playground, a live view of /metrics and, for admin keys, the keys
 * and the audit log. Plain JavaScript with no libraries; every text from the server or a
 * client is written with textContent (never as markup), and the API key travels only in
 * the Authorization header (kept in this tab's sessionStorage, never in a cookie). */
'use strict';

const $ = (id) => document.getElementById(id);
const KEY_STORE = 'zse-api-key';
const POLL_MS = 2000;
const CHART_POINTS = 60;

const state = {
  key: sessionStorage.getItem(KEY_STORE) || '',
  session: null,
  history: [],          /* the conversation: {role, content} */
  controller: null,     /* the running answer's AbortController */
  prev: null,           /* the previous /metrics sample: {t, tokens} */
  series: [],           /* {tps, running} for the chart */
  pollTimer: null,
};

/* ---- small helpers ------------------------------------------------------------------- */

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === 'class') e.className = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function setText(id, text) { $(id).textContent = text; }

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (state.key) h.Authorization = 'Bearer ' + state.key;
  return h;
}

function errorText(data, status) {
  if (data && typeof data === 'object' && data.error) {
    if (typeof data.error === 'string') return data.error;
    if (data.error.message) return data.error.message;
  }
  return 'HTTP ' + status + (typeof data === 'string' && data ? ': ' + data.slice(0, 300) : '');
}

/* JSON in and out; throws an Error with .status on a non-2xx answer */
async function api(path, opts) {
  opts = opts || {};
  const hasBody = opts.body !== undefined;
  const res = await fetch(path, {
    method: opts.method || (hasBody ? 'POST' : 'GET'),
    headers: headers(hasBody ? { 'Content-Type': 'application/json' } : {}),
    body: hasBody ? JSON.stringify(opts.body) : undefined,
    cache: 'no-store',
  });
  const text = await res.text();
  let data = text;
  try { data = text ? JSON.parse(text) : null; } catch (_) { /* not JSON: kept as text */ }
  if (!res.ok) {
    const err = new Error(errorText(data, res.status));
    err.status = res.status;
    throw err;
  }
  return data;
}

function fmtBytes(n) {
  if (!isFinite(n)) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(n)) + ' ' + units[i];
}

function fmtTime(unix) {
  if (!unix) return 'never';
  return new Date(unix * 1000).toISOString().replace('T', ' ').replace(/\.\d+Z$/, '');
}

/* ---- tabs (arrow keys move between them) ----------------------------------------------- */

function tabs() { return Array.from(document.querySelectorAll('[role=tab]')).filter((t) => !t.hidden); }

function selectTab(btn, focus) {
  for (const t of document.querySelectorAll('[role=tab]')) {
    const on = t === btn;
    t.setAttribute('aria-selected', on ? 'true' : 'false');
    t.tabIndex = on ? 0 : -1;
    $(t.getAttribute('aria-controls')).hidden = !on;
  }
  if (focus) btn.focus();
  if (btn.id === 'tab-btn-keys') loadKeys();
  if (btn.id === 'tab-btn-audit') loadAudit();
  if (btn.id === 'tab-btn-live') drawChart();
}

function setupTabs() {
  for (const t of document.querySelectorAll('[role=tab]')) {
    t.addEventListener('click', () => selectTab(t, false));
    t.addEventListener('keydown', (ev) => {
      const list = tabs();
      const i = list.indexOf(t);
      let next = null;
      if (ev.key === 'ArrowRight') next = list[(i + 1) % list.length];
      else if (ev.key === 'ArrowLeft') next = list[(i - 1 + list.length) % list.length];
      else if (ev.key === 'Home') next = list[0];
      else if (ev.key === 'End') next = list[list.length - 1];
      if (next) { ev.preventDefault(); selectTab(next, true); }
    });
  }
}

/* ---- session: who the key is, what is served ------------------------------------------ */

async function loadSession() {
  let s;
  try {
    s = await api('/ui/session');
  } catch (e) {
    if (e.status === 401 && state.key) {
      logout('That key was refused: ' + e.message);
      return;
    }
    setText('health', e.status === 503 ? 'loading' : 'unreachable');
    $('health').className = 'pill bad';
    setTimeout(loadSession, POLL_MS);
    return;
  }
  state.session = s;
  const m = s.model;
  setText('model-name', m ? m.id : 'loading…');
  setText('model-facts', m ? [m.arch, m.quant, m.device, 'ctx ' + m.ctx_size, m.n_layers + ' layers'].join(' · ') : '');
  const signedIn = !s.auth || !!s.key;
  $('login').hidden = signedIn;
  $('logout').hidden = !s.key;
  setText('whoami', s.key ? s.key + ' (' + s.role + ')' : (s.auth ? '' : 'no auth'));
  const admin = s.role === 'admin';
  $('tab-btn-keys').hidden = !admin;
  $('tab-btn-audit').hidden = !admin;
  $('tab-btn-playground').hidden = !signedIn;
  if (!signedIn) selectTab($('tab-btn-live'), false);
  else if (!document.querySelector('[role=tab][aria-selected=true]:not([hidden])')) selectTab($('tab-btn-playground'), false);
  if (signedIn && m) loadModels();
  if (!s.ready) setTimeout(loadSession, POLL_MS);
}

async function login(ev) {
  ev.preventDefault();
  const key = $('login-key').value.trim();
  if (!key) return;
  state.key = key;
  setText('login-error', '');
  try {
    const s = await api('/ui/session');
    if (s.auth && !s.key) throw new Error('no key was sent');
  } catch (e) {
    state.key = '';
    setText('login-error', 'Log in failed: ' + e.message);
    return;
  }
  sessionStorage.setItem(KEY_STORE, key);
  $('login-key').value = '';
  await loadSession();
  selectTab($('tab-btn-playground'), false);
}

function logout(message) {
  state.key = '';
  sessionStorage.removeItem(KEY_STORE);
  setText('login-error', typeof message === 'string' ? message : '');
  loadSession();
}

/* ---- playground ------------------------------------------------------------------------ */

async function loadModels() {
  try {
    const list = await api('/v1/models');
    const sel = $('chat-model');
    const current = sel.value;
    sel.replaceChildren();
    for (const m of list.data || []) {
      sel.append(el('option', { value: m.id }, m.parent ? m.id + ' (adapter of ' + m.parent + ')' : m.id));
    }
    if (current) sel.value = current;
  } catch (e) {
    setText('chat-error', 'Cannot list the models: ' + e.message);
  }
}

function addMessage(role, text) {
  const body = el('span', { class: 'text' }, text);
  const box = el('div', { class: 'msg ' + role }, body);
  $('transcript').append(box);
  box.scrollIntoView({ block: 'end' });
  return { box, body };
}

function numberOf(id) {
  const v = $(id).value.trim();
  return v === '' ? undefined : Number(v);
}

function setBusy(busy) {
  $('chat-send').disabled = busy;
  $('chat-stop').disabled = !busy;
}

/* one SSE event's data lines, joined */
function eventData(block) {
  return block.split('\n').filter((l) => l.startsWith('data:')).map((l) => l.slice(5).trimStart()).join('\n');
}

async function sendChat(ev) {
  if (ev) ev.preventDefault();
  if (state.controller) return;
  const text = $('chat-input').value;
  if (!text.trim()) return;
  setText('chat-error', '');
  $('chat-input').value = '';
  const messages = [];
  const system = $('chat-system').value.trim();
  if (system) messages.push({ role: 'system', content: system });
  messages.push(...state.history, { role: 'user', content: text });
  addMessage('user', text);
  const out = addMessage('assistant', '');
  const stats = el('span', { class: 'stats' }, 'waiting…');
  out.box.append(stats);

  const body = { model: $('chat-model').value, messages, stream: true, stream_options: { include_usage: true } };
  const fields = { temperature: 'chat-temperature', top_p: 'chat-top-p', max_tokens: 'chat-max-tokens', seed: 'chat-seed' };
  for (const [k, id] of Object.entries(fields)) {
    const v = numberOf(id);
    if (v !== undefined && !Number.isNaN(v)) body[k] = v;
  }

  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  const t0 = performance.now();
  let tFirst = 0, tLast = 0, chunks = 0, usage = null, answer = '', finish = '', failure = '';
  try {
    const res = await fetch('/v1/chat/completions', {
      method: 'POST', headers: headers({ 'Content-Type': 'application/json' }),
      body: JSON.stringify(body), signal: controller.signal, cache: 'no-store',
    });
    if (!res.ok) {
      const t = await res.text();
      let data = t;
      try { data = JSON.parse(t); } catch (_) { /* text */ }
      throw new Error(errorText(data, res.status));
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buf = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true }).replace(/\r\n/g, '\n');
      let cut;
      while ((cut = buf.indexOf('\n\n')) >= 0) {
        const data = eventData(buf.slice(0, cut));
        buf = buf.slice(cut + 2);
        if (!data || data === '[DONE]') continue;
        const obj = JSON.parse(data);
        if (obj.error) { failure = errorText(obj, 500); continue; }
        if (obj.usage) usage = obj.usage;
        const choice = (obj.choices || [])[0];
        if (!choice) continue;
        if (choice.finish_reason) finish = choice.finish_reason;
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          tLast = performance.now();
          if (!tFirst) tFirst = tLast;
          chunks++;
          answer += piece;
          out.body.textContent = answer;
        }
      }
    }
  } catch (e) {
    if (e.name === 'AbortError') finish = 'stopped';
    else failure = e.message;
  } finally {
    state.controller = null;
    setBusy(false);
  }
  if (failure) setText('chat-error', failure);
  if (answer) {
    state.history.push({ role: 'user', content: text }, { role: 'assistant', content: answer });
  }
  const tokens = usage ? usage.completion_tokens : chunks;
  const parts = [tokens + ' tokens'];
  if (tFirst) parts.push('TTFT ' + Math.round(tFirst - t0) + ' ms');
  if (tFirst && tLast > tFirst && tokens > 1) parts.push(((tokens - 1) / ((tLast - tFirst) / 1000)).toFixed(1) + ' tokens/s');
  if (finish) parts.push(finish);
  stats.textContent = parts.join(' · ');
}

function stopChat() {
  if (state.controller) state.controller.abort();
}

function clearChat() {
  stopChat();
  state.history = [];
  $('transcript').replaceChildren();
  setText('chat-error', '');
}

/* ---- live view: /metrics every two seconds -------------------------------------------- */

/* Prometheus text → {name: [{labels, value}]} */
function parseMetrics(text) {
  const out = {};
  for (const line of text.split('\n')) {
    if (!line || line[0] === '#') continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels = {};
    for (const pair of (m[3] || '').matchAll(/([a-zA-Z_]+)="((?:[^"\\]|\\.)*)"/g)) labels[pair[1]] = pair[2];
    (out[m[1]] = out[m[1]] || []).push({ labels, value: Number(m[4]) });
  }
  return out;
}

function one(metrics, name) {
  const s = metrics[name];
  return s && s.length ? s[0].value : NaN;
}

function sum(metrics, name, keep) {
  return (metrics[name] || []).filter((s) => !keep || keep(s.labels)).reduce((a, s) => a + s.value, 0);
}

const GENERATION_ROUTES = new Set(['/v1/chat/completions', '/v1/completions', '/generate', '/generate_stream', '/']);

function showMetrics(m, now) {
  const running = one(m, 'zse_running_sequences');
  const tokens = one(m, 'zse_generation_tokens_total');
  let tps = 0;
  if (state.prev && now > state.prev.t) tps = Math.max(0, (tokens - state.prev.tokens) / ((now - state.prev.t) / 1000));
  state.prev = { t: now, tokens };
  state.series.push({ tps, running: isFinite(running) ? running : 0 });
  if (state.series.length > CHART_POINTS) state.series.shift();

  setText('live-running', isFinite(running) ? String(running) : '–');
  setText('live-queued', String(one(m, 'zse_queue_depth')));
  setText('live-tps', tps.toFixed(1));
  const used = one(m, 'zse_kv_blocks_used'), cap = one(m, 'zse_kv_blocks_capacity');
  setText('live-kv', cap > 0 ? Math.round((100 * used) / cap) + '% (' + used + '/' + cap + ' blocks)' : '–');
  const hit = one(m, 'zse_prefix_cache_hit_tokens_total'), query = one(m, 'zse_prefix_cache_query_tokens_total');
  setText('live-prefix', query > 0 ? Math.round((100 * hit) / query) + '% of ' + query + ' tokens' : '–');
  const devUsed = one(m, 'zse_device_memory_used_bytes'), devCap = one(m, 'zse_device_memory_capacity_bytes');
  if (isFinite(devUsed) && devCap > 0) setText('live-memory', 'GPU ' + fmtBytes(devUsed) + ' / ' + fmtBytes(devCap));
  else if (m.zse_memory_bytes) setText('live-memory', 'CPU ' + fmtBytes(sum(m, 'zse_memory_bytes')));
  else setText('live-memory', '–');
  setText('live-requests', String(sum(m, 'zse_requests_total', (l) => GENERATION_ROUTES.has(l.route))));
  setText('live-tokens', isFinite(tokens) ? String(tokens) : '–');
  const ready = one(m, 'zse_model_ready') === 1;
  setText('health', ready ? 'ready' : 'loading');
  $('health').className = 'pill ' + (ready ? 'ok' : 'bad');
  drawChart();
}

function drawChart() {
  const canvas = $('live-chart');
  if ($('tab-live').hidden) return;
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 720, h = canvas.clientHeight || 180;
  canvas.width = Math.round(w * ratio);
  canvas.height = Math.round(h * ratio);
  const g = canvas.getContext('2d');
  g.scale(ratio, ratio);
  g.clearRect(0, 0, w, h);
  const css = getComputedStyle(document.documentElement);
  const pad = 6;
  const line = (values, color) => {
    const max = Math.max(1, ...values);
    g.strokeStyle = color;
    g.lineWidth = 2;
    g.beginPath();
    values.forEach((v, i) => {
      const x = pad + ((w - 2 * pad) * i) / (CHART_POINTS - 1);
      const y = h - pad - ((h - 2 * pad) * v) / max;
      if (i) g.lineTo(x, y); else g.moveTo(x, y);
    });
    g.stroke();
    g.fillStyle = color;
    g.font = '12px system-ui, sans-serif';
    return max;
  };
  const maxTps = line(state.series.map((p) => p.tps), css.getPropertyValue('--accent').trim() || '#2463eb');
  line(state.series.map((p) => p.running), css.getPropertyValue('--warn').trim() || '#9a6700');
  g.fillStyle = css.getPropertyValue('--muted').trim() || '#5b6470';
  g.fillText('max ' + maxTps.toFixed(1) + ' tokens/s', pad + 2, pad + 12);
}

async function pollMetrics() {
  try {
    const res = await fetch('/metrics', { cache: 'no-store' });
    if (!res.ok) throw new Error('HTTP ' + res.status);
    showMetrics(parseMetrics(await res.text()), performance.now());
    setText('live-error', '');
  } catch (e) {
    setText('live-error', 'Cannot read /metrics: ' + e.message);
    setText('health', 'unreachable');
    $('health').className = 'pill bad';
  }
  state.pollTimer = setTimeout(pollMetrics, POLL_MS);
}

/* ---- keys (admin) ---------------------------------------------------------------------- */

function keyRow(k) {
  const rate = el('input', { type: 'number', min: '0', step: '1', 'aria-label': 'Rate limit of ' + k.name });
  rate.value = String(k.rate_limit_per_min);
  const act = (label, cls, fn) => el('button', { type: 'button', class: cls, onclick: fn }, label);
  const actions = el('div', { class: 'actions' },
    rate,
    act('Set limit', 'quiet', () => changeKey(k.name, 'POST', { rate_limit: Number(rate.value) })),
    act(k.enabled ? 'Disable' : 'Enable', 'quiet', () => changeKey(k.name, 'POST', { enabled: !k.enabled })),
    act('Delete', 'danger', () => {
      if (window.confirm('Delete key ' + k.name + '? Clients using it get 401 from now on.')) changeKey(k.name, 'DELETE');
    }));
  const tr = el('tr', { 'data-key': k.name },
    el('td', {}, k.name), el('td', {}, el('code', {}, k.prefix + '…')), el('td', {}, k.role),
    el('td', {}, k.rate_limit_per_min ? k.rate_limit_per_min + '/min' : 'none'), el('td', {}, String(k.priority)),
    el('td', {}, k.enabled ? 'enabled' : 'disabled'), el('td', {}, fmtTime(k.last_used)), el('td', {}, actions));
  return tr;
}

async function loadKeys() {
  try {
    const data = await api('/admin/keys');
    $('keys-table').tBodies[0].replaceChildren(...data.keys.map(keyRow));
  } catch (e) {
    setText('keys-error', e.message);
  }
}

async function changeKey(name, method, body) {
  setText('keys-error', '');
  try {
    await api('/admin/keys/' + encodeURIComponent(name), { method, body });
  } catch (e) {
    setText('keys-error', e.message);
  }
  loadKeys();
}

async function createKey(ev) {
  ev.preventDefault();
  const body = {
    name: $('key-name').value.trim(),
    rate_limit: Number($('key-rate').value || 0),
    priority: Number($('key-priority').value || 0),
    role: $('key-role').value,
  };
  try {
    const k = await api('/admin/keys', { body });
    setText('key-created-name', k.name);
    setText('key-created-value', k.key);
    $('key-created').hidden = false;
    $('key-name').value = '';
    setText('keys-error', '');
  } catch (e) {
    $('key-created').hidden = true;
    setText('keys-error', e.message);
  }
  loadKeys();
}

/* ---- audit log (admin) ----------------------------------------------------------------- */

async function loadAudit(ev) {
  if (ev) ev.preventDefault();
  const q = new URLSearchParams({ since: $('audit-since').value, limit: $('audit-limit').value || '200' });
  const key = $('audit-key').value.trim();
  if (key) q.set('key', key);
  try {
    const data = await api('/admin/audit?' + q.toString());
    const rows = data.rows.slice().reverse().map((r) => el('tr', {},
      el('td', {}, fmtTime(r.time)), el('td', {}, r.key || '–'), el('td', {}, r.method), el('td', {}, r.route),
      el('td', {}, String(r.status)), el('td', {}, r.latency_ms.toFixed(1)),
      el('td', {}, r.prompt_tokens + ' / ' + r.completion_tokens), el('td', {}, r.client)));
    $('audit-table').tBodies[0].replaceChildren(...rows);
    setText('audit-error', rows.length ? '' : 'No requests in that window.');
  } catch (e) {
    setText('audit-error', e.message);
  }
}

/* ---- start ------------------------------------------------------------------------------ */

function start() {
  setupTabs();
  $('login-form').addEventListener('submit', login);
  $('logout').addEventListener('click', () => logout(''));
  $('chat-form').addEventListener('submit', sendChat);
  $('chat-input').addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) sendChat(ev);
  });
  document.addEventListener('keydown', (ev) => { if (ev.key === 'Escape') stopChat(); });
  $('chat-stop').addEventListener('click', stopChat);
  $('chat-clear').addEventListener('click', clearChat);
  $('key-form').addEventListener('submit', createKey);
  $('audit-form').addEventListener('submit', loadAudit);
  window.addEventListener('resize', drawChart);
  loadSession();
  pollMetrics();
}

document.addEventListener('DOMContentLoaded', start);
