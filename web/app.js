'use strict';

// Countersign browser UI: one page, no framework, no build step.
//
// Security rules this file keeps:
// - Everything that comes from the server goes into the page as text (textContent or text
//   nodes via el()), never as HTML: agents write memos and key names are user input.
// - The access token lives only in `session.token`, never in storage or cookies, so a reload
//   means logging in again.
// - No inline styles (the CSP forbids them): looks change through classes and `hidden`.

/* ------------------------------------------------------------------ state */

const session = {
  token: null,
  me: null,
  // Bumped on every login and logout so that answers to an old session's requests are dropped.
  epoch: 0,
  ready: false, // the first load is done: from then on new prompts are announced
  expiryTimer: 0,
  warnTimer: 0,
  pollTimer: 0,
  // While a request that may end this token and hand back its successor (`confirm_mfa`) is
  // in flight: settles once the page has the successor, if there is one.
  renewal: null,
};

const store = {
  wallets: [],
  txs: new Map(), // transaction_id -> latest TransactionView
};

// DOM nodes by transaction id, so live updates touch one card or row in place and never wipe
// a code someone is typing.
const nodes = {
  prompts: new Map(),
  rows: new Map(),
};

const live = {
  ws: null,
  connectId: 0,
  connecting: false,
  lastPosition: 0,
  positionAtConnect: 0,
  attempt: 0,
  timer: 0,
  status: 'offline',
};

const mfaUi = { replacing: false, secretShown: false };

let serverOffsetMs = 0;
let statusTimer = 0;
let walletRefreshTimer = 0;
let fullRefreshTimer = 0;

const STATUS_LABELS = {
  pending_authorization: 'pending authorization',
  authorized: 'authorized',
  rejected: 'rejected',
  expired: 'expired',
  executed: 'executed',
  confirmed: 'confirmed',
  failed: 'failed',
};

const BALANCE_EVENTS = new Set(['TransactionExecuted', 'TransactionConfirmed', 'TransactionFailed']);

const CONN_TEXT = {
  offline: 'Offline',
  connecting: 'Connecting…',
  live: 'Live',
  reconnecting: 'Reconnecting…',
};

const FRIENDLY_ERRORS = {
  network_error: 'The server could not be reached. Check your connection and try again.',
  bad_response: 'The server sent an unexpected answer. Try again in a moment.',
  mfa_code_replayed: 'That code was already used — wait for the next one.',
  invalid_mfa_code: 'That code is not valid. Check it (and the clock of your phone) and try again.',
  mfa_code_required: 'Enter a current code from your existing authenticator.',
  mfa_not_enabled: 'Set up two-factor authentication first.',
  no_pending_mfa: 'No setup is in progress. Start again to get a new QR code.',
  invalid_password: 'That password is not correct.',
  username_taken: 'That username is already taken.',
  transaction_expired: 'This request expired before it was answered.',
  invalid_state: 'This transaction is no longer waiting for a decision.',
  conflict: 'Something else changed at the same moment. Please try again.',
  not_found: 'Not found: it may not exist, or it is not yours.',
  chain_unavailable: 'The blockchain node is unreachable right now. Try again later.',
  payload_too_large: 'That is too much text.',
  request_timeout: 'The server took too long to answer. Try again.',
  internal_error: 'The server ran into a problem. Try again in a moment.',
  unavailable: 'The server is not ready. Try again in a moment.',
};

/* ------------------------------------------------------------------ DOM helpers */

const $ = (selector, root = document) => root.querySelector(selector);
const $$ = (selector, root = document) => Array.from(root.querySelectorAll(selector));

// Creates an element. Strings among the children become text nodes (Node.append), so server
// data can never turn into markup.
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === 'class') node.className = value;
    else node.setAttribute(name, value === true ? '' : String(value));
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) node.append(child);
  }
  return node;
}

// Message elements are live regions: they stay in the page (empty ones collapse in CSS)
// because screen readers can miss text put into a region that was just un-hidden.
function setMsg(node, text, kind = 'error') {
  if (!node) return;
  node.textContent = text || '';
  node.dataset.kind = kind;
}

function announce(text, kind = 'info') {
  const node = $('#status');
  setMsg(node, text, kind);
  clearTimeout(statusTimer);
  statusTimer = setTimeout(() => setMsg(node, ''), kind === 'error' ? 20000 : 8000);
}

function announceInbox(text) {
  const node = $('#inbox-live');
  // Clearing first makes screen readers repeat a message identical to the last one.
  node.textContent = '';
  requestAnimationFrame(() => { node.textContent = text; });
}

function setControlsDisabled(root, disabled) {
  for (const control of $$('input, button, textarea, select', root)) control.disabled = disabled;
}

// Disables every button in `container` while `fn` runs, then restores each one.
async function withBusy(container, fn) {
  const buttons = $$('button', container);
  const before = buttons.map((b) => b.disabled);
  buttons.forEach((b) => { b.disabled = true; });
  container.setAttribute('aria-busy', 'true');
  try {
    return await fn();
  } finally {
    buttons.forEach((b, i) => { b.disabled = before[i]; });
    container.removeAttribute('aria-busy');
  }
}

function selectText(node) {
  const range = document.createRange();
  range.selectNodeContents(node);
  const selection = window.getSelection();
  selection.removeAllRanges();
  selection.addRange(range);
}

function flashButton(button, text) {
  if (!button.dataset.label) button.dataset.label = button.textContent;
  button.textContent = text;
  clearTimeout(Number(button.dataset.timer));
  button.dataset.timer = String(setTimeout(() => { button.textContent = button.dataset.label; }, 2000));
}

// Copies `text`; where the Clipboard API is missing (plain http) or refused, it shows the full
// text in `source` and selects it so Ctrl+C works.
async function copyText(text, source, button) {
  try {
    if (!navigator.clipboard || !window.isSecureContext) throw new Error('clipboard unavailable');
    await navigator.clipboard.writeText(text);
    flashButton(button, 'Copied');
    announce('Copied to the clipboard.', 'ok');
  } catch {
    source.textContent = text;
    selectText(source);
    flashButton(button, 'Selected');
    announce('Press Ctrl+C (⌘C on a Mac) to copy the selected text.', 'info');
  }
}

function copyButton(text, source, label) {
  const button = el('button', { type: 'button', class: 'copy', 'aria-label': label }, 'Copy');
  button.addEventListener('click', () => copyText(text, source, button));
  return button;
}

function joinNodes(items, separator = ', ') {
  return items.flatMap((item, i) => (i === 0 ? [item] : [separator, item]));
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/* ------------------------------------------------------------------ formatting */

// Base units -> decimal string with at most `maxFraction` digits (truncated, trailing zeros
// trimmed). BigInt only: wei amounts do not fit in a double.
function formatUnits(raw, decimals = 18, maxFraction = 6) {
  const text = String(raw ?? '');
  if (!/^\d+$/.test(text)) return text || '?';
  const value = BigInt(text);
  const base = 10n ** BigInt(decimals);
  const whole = value / base;
  const fraction = (value % base)
    .toString()
    .padStart(decimals, '0')
    .slice(0, maxFraction)
    .replace(/0+$/, '');
  return fraction ? `${whole}.${fraction}` : whole.toString();
}

const formatEth = (wei) => formatUnits(wei, 18, 6);

// For approval prompts: never let truncation hide that an amount is not exactly what is shown.
function describeWei(wei) {
  const text = String(wei ?? '');
  if (!/^\d+$/.test(text)) return `${text || '?'} wei`;
  const value = BigInt(text);
  const eth = formatEth(text);
  if (value !== 0n && eth === '0') return 'less than 0.000001 ETH';
  const exact = value % 10n ** 12n === 0n;
  return `${exact ? '' : '≈ '}${eth} ETH`;
}

function shortAddress(address) {
  const text = String(address ?? '');
  return text.length > 13 ? `${text.slice(0, 6)}…${text.slice(-4)}` : text;
}

// Date.parse is only specified for up to 3 fractional digits; the server sends up to 9.
function parseTime(iso) {
  if (typeof iso !== 'string') return NaN;
  return Date.parse(iso.replace(/\.(\d+)/, (_, digits) => `.${digits.slice(0, 3).padEnd(3, '0')}`));
}

const dateTimeFormat = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'short' });
const preciseFormat = new Intl.DateTimeFormat(undefined, { dateStyle: 'short', timeStyle: 'medium' });
const clockFormat = new Intl.DateTimeFormat(undefined, { timeStyle: 'medium' });

function timeEl(iso, format = dateTimeFormat) {
  const ms = parseTime(iso);
  return el('time', { datetime: iso }, Number.isNaN(ms) ? String(iso ?? '') : format.format(ms));
}

function formatCountdown(totalSeconds) {
  const s = Math.max(0, totalSeconds);
  const hours = Math.floor(s / 3600);
  const mmss = `${String(Math.floor((s % 3600) / 60)).padStart(2, '0')}:${String(s % 60).padStart(2, '0')}`;
  return hours ? `${hours}:${mmss}` : mmss;
}

const statusLabel = (status) => STATUS_LABELS[status] || String(status);

function initiatorName(view) {
  const initiator = view.initiator || {};
  if (initiator.type === 'agent') return initiator.api_key_name || 'an agent';
  if (initiator.type === 'user') return 'you';
  return 'unknown';
}

function actorLabel(event) {
  switch (event.actor_type) {
    case 'user': return session.me && event.actor === session.me.user_id ? 'user (you)' : 'user';
    case 'api_key': return 'agent key';
    case 'system': return 'system';
    default: return '—';
  }
}

/* ------------------------------------------------------------------ API */

class ApiError extends Error {
  constructor(status, code, message, field, retryAfter) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
    this.code = code;
    this.field = field;
    // Seconds to wait (429 answers carry Retry-After).
    this.retryAfter = retryAfter;
  }
}

// An answer that arrived after its session ended: callers drop it silently.
class StaleError extends Error {}

const invalid = (field, message) => new ApiError(0, 'invalid_field', message, field);

// "3 minutes", "40 seconds": how long a 429 asks to wait.
function waitText(seconds) {
  if (!(seconds > 0)) return 'a while';
  if (seconds < 90) return `${seconds} second${seconds === 1 ? '' : 's'}`;
  return `${Math.ceil(seconds / 60)} minutes`;
}

function describeError(err) {
  if (!(err instanceof ApiError)) return 'Something went wrong. Try again.';
  if (err.code === 'mfa_locked') {
    return `Too many wrong codes. Actions that need a code are locked for ${waitText(err.retryAfter)}; `
      + 'even a correct code is refused until then. Rejecting still works.';
  }
  if (err.code === 'rate_limited') return `Too many attempts. Try again in ${waitText(err.retryAfter)}.`;
  return FRIENDLY_ERRORS[err.code] || err.message || 'Something went wrong. Try again.';
}

// The device clock may be wrong; countdowns follow the server's clock when it clearly differs.
function noteServerClock(response) {
  const date = Date.parse(response.headers.get('Date') || '');
  if (Number.isNaN(date)) return;
  // HTTP dates drop the milliseconds: +1 s errs towards showing less time left, never more.
  const offset = date + 1000 - Date.now();
  serverOffsetMs = Math.abs(offset) > 3000 ? offset : 0;
}

async function api(method, path, body, { auth = true, renews = false } = {}) {
  const epoch = session.epoch;
  const token = session.token;
  const headers = { 'Content-Type': 'application/json', Accept: 'application/json' };
  if (auth) {
    if (!token) throw new StaleError('signed out');
    headers.Authorization = `Bearer ${token}`;
  }
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: 'no-store',
      credentials: 'omit',
    });
  } catch {
    if (epoch !== session.epoch) throw new StaleError('session changed');
    throw new ApiError(0, 'network_error', 'The server could not be reached.');
  }
  let payload = null;
  try {
    const text = await response.text();
    payload = text ? JSON.parse(text) : null;
  } catch {
    payload = null;
  }
  // The server ends the old token as it answers a renewal, so a 401 may arrive before that
  // answer: wait for it before deciding whether the session ended.
  if (response.status === 401 && auth && !renews && session.renewal) await session.renewal;
  if (epoch !== session.epoch) throw new StaleError('session changed');
  noteServerClock(response);
  if (response.ok) {
    if (payload === null && response.status !== 204) {
      throw new ApiError(response.status, 'bad_response', 'The server sent an unexpected answer.');
    }
    return payload;
  }
  // Sent with a token this page has since replaced (see renewToken): not the session's end.
  if (response.status === 401 && auth && token !== session.token) throw new StaleError('token renewed');
  if (response.status === 401 && auth) {
    expireSession('Your session has expired. Please log in again.');
    throw new StaleError('session expired');
  }
  const error = (payload && payload.error) || {};
  const retryAfter = Number.parseInt(response.headers.get('Retry-After') || '', 10);
  // A lockout shows in the security section too.
  if (error.code === 'mfa_locked' && auth) refreshMe();
  throw new ApiError(
    response.status,
    error.code || `http_${response.status}`,
    error.message || `The server answered with status ${response.status}.`,
    error.field,
    Number.isNaN(retryAfter) ? undefined : retryAfter,
  );
}

/* ------------------------------------------------------------------ forms */

function readCode(input) {
  const code = input.value.replace(/\s+/g, '');
  if (!/^\d{6}$/.test(code)) throw invalid(input.name, 'Enter the 6-digit code from your authenticator app.');
  return code;
}

function clearFormErrors(form) {
  setMsg($('.form-msg', form), '');
  for (const input of $$('[aria-invalid]', form)) input.removeAttribute('aria-invalid');
}

function showFormError(form, err) {
  if (err instanceof StaleError) return;
  if (!(err instanceof ApiError)) console.error(err);
  setMsg($('.form-msg', form), describeError(err), 'error');
  const input = err.field ? form.elements.namedItem(err.field) : null;
  if (input instanceof HTMLInputElement) {
    input.setAttribute('aria-invalid', 'true');
    input.focus();
    input.select();
  }
}

function onSubmit(form, handler) {
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    if (form.getAttribute('aria-busy') === 'true') return;
    clearFormErrors(form);
    withBusy(form, () => handler(form)).catch((err) => showFormError(form, err));
  });
}

/* ------------------------------------------------------------------ session */

async function submitLogin(form) {
  const username = $('#login-username').value.trim();
  const password = $('#login-password').value;
  const res = await api('POST', '/api/login', { username, password }, { auth: false });
  await startSession(res.access_token, res.expires_in);
  form.reset();
}

async function submitRegister(form) {
  const username = $('#register-username').value.trim();
  const password = $('#register-password').value;
  if ([...password].length < 12) throw invalid('password', 'The password needs at least 12 characters.');
  await api('POST', '/api/register', { username, password }, { auth: false });
  const res = await api('POST', '/api/login', { username, password }, { auth: false });
  form.reset();
  await startSession(res.access_token, res.expires_in);
  announce(`Welcome, ${username}. Start by setting up two-factor authentication.`, 'ok');
}

async function startSession(token, expiresIn) {
  resetSession();
  session.token = token;
  try {
    session.me = await api('GET', '/api/me');
  } catch (err) {
    resetSession();
    throw err;
  }
  scheduleSessionEnd(expiresIn);
  setMsg($('#auth-msg'), '');
  showApp();
  renderMe();
  // Focus the first section: the MFA setup while MFA is off, otherwise the inbox.
  $(session.me.mfa_enabled ? '#inbox-heading' : '#security-heading').focus();
  session.pollTimer = setInterval(pollWhileOffline, 15000);
  await loadEverything();
}

function scheduleSessionEnd(expiresIn) {
  const ms = Number(expiresIn) * 1000;
  if (!Number.isFinite(ms) || ms <= 0 || ms > 2 ** 31 - 1) return;
  if (ms > 120000) {
    session.warnTimer = setTimeout(
      () => announce('Your session ends in about a minute; then you will need to log in again.', 'info'),
      ms - 60000,
    );
  }
  session.expiryTimer = setTimeout(() => expireSession('Your session has ended. Please log in again.'), ms);
}

// Forgets everything about the current user: token, data, timers, socket and what is on screen.
function resetSession() {
  session.epoch += 1;
  session.token = null;
  session.me = null;
  session.ready = false;
  session.renewal = null;
  clearTimeout(session.expiryTimer);
  clearTimeout(session.warnTimer);
  clearInterval(session.pollTimer);
  clearTimeout(walletRefreshTimer);
  clearTimeout(fullRefreshTimer);
  stopLive();
  live.lastPosition = 0;
  store.wallets = [];
  store.txs.clear();
  clearUserInterface();
}

function clearUserInterface() {
  nodes.prompts.clear();
  nodes.rows.clear();
  for (const id of ['#inbox-list', '#activity-list', '#wallet-list', '#key-list', '#key-scope-list']) {
    $(id).replaceChildren();
  }
  hideNewKey();
  clearMfaSecret();
  mfaUi.replacing = false;
  for (const form of $$('#app-view form')) form.reset();
  for (const msg of $$('#app-view .msg, #app-view .form-msg')) setMsg(msg, '');
  $('#inbox-live').textContent = '';
  updateInboxCount();
  $('#activity-empty').hidden = false;
  $('#wallets-empty').hidden = false;
  $('#keys-empty').hidden = false;
}

function showApp() {
  $('#auth-view').hidden = true;
  $('#app-view').hidden = false;
  $('#session-bar').hidden = false;
  $('#app-nav').hidden = false;
}

function showLogin(message, username = '') {
  $('#app-view').hidden = true;
  $('#session-bar').hidden = true;
  $('#app-nav').hidden = true;
  $('#auth-view').hidden = false;
  setMsg($('#auth-msg'), message, 'info');
  const input = $('#login-username');
  if (username) input.value = username;
  (username ? $('#login-password') : input).focus();
}

function expireSession(message) {
  if (!session.token) return;
  const username = session.me ? session.me.username : '';
  resetSession();
  showLogin(message, username);
}

// Ends the token on the server too (a copy of it stops working), then forgets it here.
async function logout() {
  const token = session.token;
  resetSession();
  showLogin('You have logged out.');
  if (!token) return;
  try {
    const response = await fetch('/api/logout', {
      method: 'POST',
      headers: { Authorization: `Bearer ${token}` },
      cache: 'no-store',
      credentials: 'omit',
    });
    if (!response.ok && response.status !== 401) throw new Error(`status ${response.status}`);
  } catch {
    setMsg($('#auth-msg'), 'You have logged out here, but the server could not be told: '
      + 'the session ends by itself when it expires.', 'info');
  }
}

// Carry on with a new token (the server ended the old one, e.g. after an MFA replacement).
function renewToken(token, expiresIn) {
  session.token = token;
  clearTimeout(session.expiryTimer);
  clearTimeout(session.warnTimer);
  scheduleSessionEnd(expiresIn);
  stopLive();
  connectLive();
}

async function loadEverything() {
  const epoch = session.epoch;
  // Read the log position *before* the snapshot: resuming the socket from there cannot miss
  // an event that happens between the snapshot and the socket opening.
  const position = await api('GET', '/healthz', undefined, { auth: false })
    .then((res) => Number(res && res.position) || 0, () => 0);
  await Promise.all([loadWallets(), loadKeys(), loadTransactions()]);
  if (epoch !== session.epoch) return;
  session.ready = true;
  const newest = Math.max(0, ...Array.from(store.txs.values(), (v) => Number(v.position) || 0));
  live.lastPosition = Math.max(live.lastPosition, position, newest);
  connectLive();
}

/* ------------------------------------------------------------------ MFA */

async function refreshMe() {
  try {
    session.me = await api('GET', '/api/me');
    renderMe();
  } catch {
    // The screen keeps what it had; the next action will surface any real problem.
  }
}

function renderMe() {
  const me = session.me;
  if (!me) return;
  $('#whoami').textContent = me.username;
  const enabled = Boolean(me.mfa_enabled);
  placeSecuritySection(enabled);
  $('#inbox-mfa-warning').hidden = enabled;
  $('#mfa-state').textContent = enabled
    ? 'On. A code from your authenticator app countersigns each transaction and each new agent key.'
    : 'Off. You need it before you can authorize transactions or issue agent keys.';
  const lockedUntil = me.mfa_locked_until ? new Date(me.mfa_locked_until) : null;
  if (lockedUntil && !Number.isNaN(lockedUntil.getTime())) {
    $('#mfa-state').textContent += ` Locked after too many wrong codes until ${lockedUntil.toLocaleTimeString()}:`
      + ' nothing that needs a code can be done until then.';
  }
  renderMfaForms();
}

// Until MFA is on, its setup comes first on the page; afterwards it sits with the settings.
function placeSecuritySection(enabled) {
  const section = $('#security');
  const target = enabled ? $('#side-col') : $('#mfa-slot');
  if (section.parentElement !== target) target.append(section);
  section.classList.toggle('is-prominent', !enabled);
}

function renderMfaForms() {
  const enabled = Boolean(session.me && session.me.mfa_enabled);
  const pending = Boolean(session.me && session.me.mfa_pending);
  const enrolling = mfaUi.secretShown;
  $('#mfa-start-form').hidden = enrolling || (enabled && !mfaUi.replacing);
  $('#mfa-current-code-field').hidden = !enabled;
  $('#mfa-cancel-btn').hidden = !enabled;
  $('#mfa-start-intro').textContent = enabled
    ? 'Enter a code from your current authenticator and your password. The current one keeps working until the new one is confirmed.'
    : 'Confirm your password to get a QR code for your authenticator app.';
  $('#mfa-replace-btn').hidden = !enabled || mfaUi.replacing || enrolling;
  $('#mfa-enrol').hidden = !(enrolling || (pending && !enabled));
  $('#mfa-secret-box').hidden = !enrolling;
  $('#mfa-pending-note').hidden = enrolling;
  $('#mfa-restart-btn').hidden = !enrolling;
}

async function submitMfaStart(form) {
  const body = { password: $('#mfa-password').value };
  if (session.me.mfa_enabled) body.mfa_code = readCode($('#mfa-current-code'));
  const res = await api('POST', '/api/setup_mfa', body);
  form.reset();
  session.me = { ...session.me, mfa_pending: true };
  showMfaSecret(res);
}

function showMfaSecret(res) {
  const qr = $('#mfa-qr');
  const png = typeof res.qr_png_base64 === 'string' ? res.qr_png_base64 : '';
  if (/^[A-Za-z0-9+/]+={0,2}$/.test(png)) {
    qr.src = `data:image/png;base64,${png}`;
    qr.hidden = false;
  } else {
    qr.removeAttribute('src');
    qr.hidden = true;
  }
  $('#mfa-secret').textContent = String(res.secret ?? '');
  const link = $('#mfa-otpauth');
  const uri = typeof res.otpauth_uri === 'string' ? res.otpauth_uri : '';
  link.hidden = !uri.startsWith('otpauth://');
  link.href = link.hidden ? '#' : uri;
  mfaUi.secretShown = true;
  renderMfaForms();
  $('#mfa-enrol-heading').focus();
}

function clearMfaSecret() {
  mfaUi.secretShown = false;
  $('#mfa-secret').textContent = '';
  const qr = $('#mfa-qr');
  qr.removeAttribute('src');
  qr.hidden = true;
  const link = $('#mfa-otpauth');
  link.href = '#';
  link.hidden = true;
}

async function submitMfaConfirm(form) {
  const code = readCode($('#mfa-confirm-code'));
  // Replacing MFA ends every earlier session; this one goes on with the token it returned.
  const confirmation = api('POST', '/api/confirm_mfa', { mfa_code: code }, { renews: true })
    .then((res) => {
      if (res && typeof res.access_token === 'string') renewToken(res.access_token, res.expires_in);
      return res;
    });
  const renewal = confirmation.then(() => {}, () => {});
  session.renewal = renewal;
  renewal.then(() => { if (session.renewal === renewal) session.renewal = null; });
  await confirmation;
  const replaced = Boolean(session.me.mfa_enabled);
  form.reset();
  clearMfaSecret();
  mfaUi.replacing = false;
  session.me = { ...session.me, mfa_enabled: true, mfa_pending: false };
  renderMe();
  announce(replaced
    ? 'Your new authenticator is active; the old one no longer works.'
    : 'Two-factor authentication is on. You can now authorize transactions and issue agent keys.', 'ok');
  $('#inbox-heading').focus();
  refreshMe();
}

function startMfaReplace() {
  mfaUi.replacing = true;
  renderMfaForms();
  $('#mfa-current-code').focus();
}

function cancelMfaReplace() {
  mfaUi.replacing = false;
  $('#mfa-start-form').reset();
  clearFormErrors($('#mfa-start-form'));
  renderMfaForms();
  $('#mfa-replace-btn').focus();
}

function restartMfa() {
  clearMfaSecret();
  $('#mfa-confirm-form').reset();
  clearFormErrors($('#mfa-confirm-form'));
  renderMfaForms();
  $('#mfa-password').focus();
}

/* ------------------------------------------------------------------ wallets */

async function loadWallets() {
  try {
    const res = await api('GET', '/api/wallets');
    store.wallets = Array.isArray(res.wallets) ? res.wallets : [];
    setMsg($('#wallets-msg'), '');
  } catch (err) {
    if (err instanceof StaleError) return;
    setMsg($('#wallets-msg'), `Couldn't load your wallets: ${describeError(err)}`);
  }
  renderWallets();
}

function scheduleWalletRefresh() {
  clearTimeout(walletRefreshTimer);
  walletRefreshTimer = setTimeout(loadWallets, 1500);
}

function renderWallets() {
  $('#wallet-list').replaceChildren(...store.wallets.map(walletItem));
  $('#wallets-empty').hidden = store.wallets.length > 0;
  renderScopeOptions();
}

function walletItem(wallet) {
  const address = el('code', { class: 'address' }, wallet.wallet_address);
  return el('li', { class: 'wallet', 'data-wallet-address': wallet.wallet_address },
    el('div', { class: 'copy-row' }, address, copyButton(wallet.wallet_address, address, 'Copy wallet address')),
    el('p', { class: 'wallet-meta' },
      el('span', { class: 'sr-only' }, 'Balance: '),
      el('span', { class: 'balance', title: wallet.balance_wei == null ? 'The chain node is unreachable' : `${wallet.balance_wei} wei`, 'data-testid': 'wallet-balance' },
        wallet.balance_wei == null ? 'balance unavailable' : `${formatEth(wallet.balance_wei)} ETH`),
      el('span', { class: 'muted' }, ` · chain ${wallet.chain_id}`)));
}

async function submitCreateWallet(form) {
  const res = await api('POST', '/api/create_wallet', { password: $('#wallet-password').value });
  form.reset();
  await loadWallets();
  setMsg($('.form-msg', form), `Wallet ${res.wallet_address} created. Fund it before your agents use it.`, 'ok');
}

/* ------------------------------------------------------------------ agent API keys */

async function loadKeys() {
  try {
    const res = await api('GET', '/api/api_keys');
    renderKeys(Array.isArray(res.api_keys) ? res.api_keys : []);
    setMsg($('#keys-msg'), '');
  } catch (err) {
    if (err instanceof StaleError) return;
    setMsg($('#keys-msg'), `Couldn't load your keys: ${describeError(err)}`);
  }
}

function renderKeys(keys) {
  $('#key-list').replaceChildren(...keys.map(keyItem));
  $('#keys-empty').hidden = keys.length > 0;
}

function keyScope(key) {
  if (!Array.isArray(key.wallet_addresses)) return 'All wallets, including future ones';
  const addresses = key.wallet_addresses.map((a) => el('code', { class: 'address', title: a }, shortAddress(a)));
  return ['Wallets: ', ...joinNodes(addresses)];
}

function keyItem(key) {
  const revoked = Boolean(key.revoked_at);
  const item = el('li', { class: revoked ? 'key is-revoked' : 'key', 'data-api-key-id': key.api_key_id },
    el('div', { class: 'key-head' },
      el('strong', { class: 'key-name' }, key.name),
      el('span', { class: revoked ? 'badge badge-muted' : 'badge badge-ok' }, revoked ? 'revoked' : 'active')),
    el('p', { class: 'key-scope' }, keyScope(key)),
    el('p', { class: 'key-dates muted' },
      'Created ', timeEl(key.created_at),
      revoked ? [' · revoked ', timeEl(key.revoked_at)] : null));
  if (!revoked) item.append(revokeControls(key));
  return item;
}

function revokeControls(key) {
  const box = el('div', { class: 'actions' });
  const start = el('button', {
    type: 'button', class: 'danger-quiet', 'data-testid': 'revoke-key', 'aria-label': `Revoke key ${key.name}`,
  }, 'Revoke…');
  start.addEventListener('click', () => box.replaceChildren(revokeConfirm(key, box, start)));
  box.append(start);
  return box;
}

function revokeConfirm(key, box, start) {
  const yes = el('button', { type: 'button', class: 'danger', 'data-testid': 'confirm-revoke' }, 'Revoke key');
  const no = el('button', { type: 'button' }, 'Cancel');
  const msg = el('p', { class: 'form-msg', 'aria-live': 'polite' });
  const confirm = el('div', { class: 'confirm', role: 'group', 'aria-label': `Confirm revoking ${key.name}` },
    el('p', {}, `Revoke “${key.name}”? Agents using it are refused from their next request. This cannot be undone.`),
    el('div', { class: 'actions' }, yes, no),
    msg);
  no.addEventListener('click', () => {
    box.replaceChildren(start);
    start.focus();
  });
  yes.addEventListener('click', () => {
    withBusy(confirm, async () => {
      await api('DELETE', `/api/api_keys/${encodeURIComponent(key.api_key_id)}`);
      announce(`Key “${key.name}” revoked.`, 'ok');
      await loadKeys();
      $('#keys-heading').focus();
    }).catch((err) => {
      if (!(err instanceof StaleError)) setMsg(msg, describeError(err));
    });
  });
  requestAnimationFrame(() => no.focus());
  return confirm;
}

function renderScopeOptions() {
  const list = $('#key-scope-list');
  const checked = new Set($$('input:checked', list).map((input) => input.value));
  const options = store.wallets.map((wallet, i) => {
    const input = el('input', {
      type: 'checkbox', id: `scope-${i}`, name: 'wallet_addresses', value: wallet.wallet_address,
      'data-testid': 'key-scope-wallet',
    });
    input.checked = checked.has(wallet.wallet_address);
    return el('div', { class: 'check' }, input,
      el('label', { for: input.id }, el('code', { class: 'address' }, wallet.wallet_address)));
  });
  list.replaceChildren(...options);
  if (!options.length) list.append(el('p', { class: 'hint' }, 'You have no wallets yet; the key will cover the ones you create.'));
}

async function submitIssueKey(form) {
  const name = $('#key-name').value.trim();
  if (!name) throw invalid('name', 'Give the key a name.');
  const code = readCode($('#key-mfa-code'));
  const wallets = $$('#key-scope-list input:checked').map((input) => input.value);
  const body = { name, mfa_code: code };
  if (wallets.length) body.wallet_addresses = wallets;
  const res = await api('POST', '/api/api_keys', body);
  form.reset();
  showNewKey(res);
  await loadKeys();
}

function showNewKey(res) {
  $('#new-key-name').textContent = String(res.name ?? '');
  $('#new-key-value').textContent = String(res.api_key ?? '');
  $('#new-key-copy').textContent = 'Copy';
  $('#new-key-panel').hidden = false;
  $('#new-key-heading').focus();
}

function hideNewKey() {
  $('#new-key-value').textContent = '';
  $('#new-key-name').textContent = '';
  $('#new-key-panel').hidden = true;
}

/* ------------------------------------------------------------------ transactions */

const listOf = (res) => (res && Array.isArray(res.transactions) ? res.transactions : []);

async function loadTransactions() {
  try {
    const [pending, all] = await Promise.all([
      api('GET', '/api/transactions?status=pending_authorization'),
      api('GET', '/api/transactions'),
    ]);
    for (const view of [...listOf(all), ...listOf(pending)]) upsertTx(view);
    setMsg($('#inbox-msg'), '');
    setMsg($('#activity-msg'), '');
  } catch (err) {
    if (err instanceof StaleError) return;
    const text = `Couldn't load transactions: ${describeError(err)}`;
    setMsg($('#inbox-msg'), text);
    setMsg($('#activity-msg'), text);
  }
  $('#activity-empty').hidden = nodes.rows.size > 0;
}

// A missed update (failed fetch) is repaired by reloading the lists a little later.
function scheduleFullRefresh() {
  clearTimeout(fullRefreshTimer);
  fullRefreshTimer = setTimeout(loadTransactions, 3000);
}

function pollWhileOffline() {
  if (session.token && live.status !== 'live') loadTransactions();
}

// Fetches one transaction's view and shows it. `minPosition` is the pushed event's position:
// the view can trail it by a projector tick, so a stale view is fetched again shortly.
async function refreshTransaction(id, minPosition = 0, options = {}) {
  const epoch = session.epoch;
  for (let attempt = 0; ; attempt += 1) {
    let view;
    try {
      view = await api('GET', `/api/transaction_status?transaction_id=${encodeURIComponent(id)}`);
    } catch (err) {
      if (!(err instanceof StaleError) && err.status !== 404) scheduleFullRefresh();
      return;
    }
    if (Number(view.position) >= minPosition || attempt >= 4) {
      upsertTx(view, options);
      return;
    }
    await sleep(250 * (attempt + 1));
    if (epoch !== session.epoch) return;
  }
}

function upsertTx(view, { quiet = false } = {}) {
  if (!view || typeof view.transaction_id !== 'string') return;
  const known = store.txs.get(view.transaction_id);
  if (known && Number(known.position) > Number(view.position)) return; // a late, older answer
  store.txs.set(view.transaction_id, view);
  renderPrompt(view, quiet);
  renderActivityRow(view);
  updateInboxCount();
}

// Prompts that can still be authorized (not expired, not already decided on this page).
function openPromptIds() {
  return [...nodes.prompts.entries()]
    .filter(([, card]) => !card.classList.contains('is-expired') && !card.classList.contains('is-decided'))
    .map(([id]) => id);
}

// One code for every open prompt: each TOTP step is accepted once, so a busy agent's burst
// would otherwise take one code (and up to 30 s) per request.
async function submitAuthorizeAll(form) {
  const ids = openPromptIds();
  if (ids.length === 0) return;
  const mfaCode = readCode($('#bulk-mfa-code'));
  await api('POST', '/api/authorize_transactions', { transaction_ids: ids, mfa_code: mfaCode });
  form.reset();
  announce(`Authorized ${ids.length} requests. The agents can now execute them.`, 'ok');
  await Promise.all(ids.map((id) => refreshTransaction(id, 0, { quiet: true })));
}

function updateInboxCount() {
  const n = nodes.prompts.size;
  const open = openPromptIds().length;
  $('#bulk-form').hidden = open < 2;
  $('#bulk-count').textContent = String(open);
  $('#inbox-count').textContent = `${n} waiting`;
  $('#inbox-empty').hidden = n > 0;
  const badge = $('#nav-inbox-count');
  badge.textContent = String(n);
  badge.hidden = n === 0;
}

function insertByCreated(list, node, createdMs) {
  node.dataset.created = String(createdMs);
  const last = list.lastElementChild;
  // Lists arrive newest first, so appending is the common case.
  if (!last || Number(last.dataset.created) >= createdMs) {
    list.append(node);
    return;
  }
  for (const child of list.children) {
    if (Number(child.dataset.created) < createdMs) {
      list.insertBefore(node, child);
      return;
    }
  }
  list.append(node);
}

/* --- the approval inbox */

function renderPrompt(view, quiet) {
  const id = view.transaction_id;
  const card = nodes.prompts.get(id);
  if (view.status !== 'pending_authorization') {
    if (!card) return;
    keepFocusOut(card, $('#inbox-heading'));
    card.remove();
    nodes.prompts.delete(id);
    if (!quiet) announceInbox(`No longer waiting: ${view.summary} (${statusLabel(view.status)}).`);
    return;
  }
  if (card) return; // a prompt does not change while it waits
  const fresh = buildPromptCard(view);
  nodes.prompts.set(id, fresh);
  insertByCreated($('#inbox-list'), fresh, parseTime(view.created_at));
  updateCountdown(fresh);
  if (session.ready && !quiet) {
    announceInbox(`New request from ${initiatorName(view)}: ${view.summary}.`);
    fresh.classList.add('is-new');
  }
}

function addressNode(address, what) {
  if (!address) return '—';
  const code = el('code', { class: 'address', title: address }, shortAddress(address));
  return el('span', { class: 'address-wrap' }, code, copyButton(address, code, `Copy the full ${what} address`));
}

function calldataNode(data) {
  const hex = String(data ?? '0x');
  const bytes = Math.max(0, (hex.length - 2) / 2);
  return el('details', { class: 'calldata' },
    el('summary', {}, `${bytes} bytes, selector ${hex.slice(0, 10)}`),
    el('code', { class: 'wrap' }, hex));
}

function promptFacts(view) {
  const rows = [];
  const add = (label, ...value) => rows.push(el('dt', {}, label), el('dd', {}, ...value));
  if (view.kind === 'erc20') {
    add('Amount',
      el('span', { class: 'amount', 'data-testid': 'prompt-amount' }, `${view.amount ?? '?'} base units`),
      el('span', { class: 'fine' }, 'Raw token units: token decimals are not applied.'));
    add('Token', addressNode(view.token_address, 'token'));
    add('Recipient', addressNode(view.to, 'recipient'));
  } else {
    const approx = describeWei(view.value) !== `${formatEth(view.value)} ETH`;
    add('Amount',
      el('span', { class: 'amount', 'data-testid': 'prompt-amount', title: `${view.value} wei` }, describeWei(view.value)),
      approx ? el('span', { class: 'fine' }, `exactly ${view.value} wei`) : null);
    if (view.kind === 'contract_call') {
      add('Contract', addressNode(view.to, 'contract'));
      add('Calldata', calldataNode(view.data));
    } else {
      add('Recipient', addressNode(view.to, 'recipient'));
    }
  }
  add('From wallet', addressNode(view.wallet_address, 'wallet'));
  add('Requested by', el('span', { class: 'agent', 'data-testid': 'prompt-agent' }, initiatorName(view)));
  add('Network', `chain ${view.chain_id}`);
  return rows;
}

function memoNode(view) {
  if (!view.memo) return el('p', { class: 'memo memo-none' }, 'The agent left no note.');
  return el('div', { class: 'memo' },
    el('p', { class: 'memo-label' }, 'Note from the agent (its own words, not verified)'),
    el('p', { class: 'memo-text', 'data-testid': 'prompt-memo' }, view.memo));
}

function buildPromptCard(view) {
  const id = view.transaction_id;
  const key = `p-${id}`;
  const summaryId = `${key}-summary`;
  const errorId = `${key}-error`;

  const countdown = el('p', { class: 'countdown' },
    el('span', { class: 'countdown-label', 'aria-hidden': 'true' }, 'Expires in '),
    el('span', { class: 'countdown-value', 'aria-hidden': 'true', 'data-testid': 'countdown' }, '--:--'),
    el('span', { class: 'sr-only countdown-sr' },
      Number.isNaN(parseTime(view.expires_at)) ? '' : `Expires at ${clockFormat.format(parseTime(view.expires_at))}.`));

  const codeInput = el('input', {
    id: `${key}-code`, name: 'mfa_code', class: 'code-input', type: 'text', inputmode: 'numeric',
    autocomplete: 'one-time-code', maxlength: '7', 'aria-describedby': errorId, 'data-testid': 'mfa-code',
  });
  const authorizeForm = el('form', { class: 'decide decide-authorize' },
    el('div', { class: 'field' }, el('label', { for: codeInput.id }, '6-digit code'), codeInput),
    el('button', { type: 'submit', class: 'primary', 'data-testid': 'authorize', 'aria-describedby': summaryId }, 'Authorize'));

  const reasonInput = el('input', {
    id: `${key}-reason`, name: 'reason', type: 'text', maxlength: '500', autocomplete: 'off',
    'data-testid': 'reject-reason',
  });
  const rejectForm = el('form', { class: 'decide decide-reject' },
    el('div', { class: 'field' },
      el('label', { for: reasonInput.id }, 'Reason ', el('span', { class: 'optional' }, '(optional)')), reasonInput),
    el('button', { type: 'submit', class: 'danger', 'data-testid': 'reject', 'aria-describedby': summaryId }, 'Reject'));

  const card = el('article', {
    class: 'card prompt', 'data-testid': 'prompt', 'data-transaction-id': id,
    'data-expires-at': String(parseTime(view.expires_at)), 'aria-labelledby': summaryId,
  },
  el('div', { class: 'prompt-head' },
    el('h3', { class: 'prompt-summary', id: summaryId, tabindex: '-1', 'data-testid': 'prompt-summary' }, view.summary),
    countdown),
  el('dl', { class: 'facts' }, promptFacts(view)),
  memoNode(view),
  el('div', { class: 'decisions' }, authorizeForm, rejectForm),
  el('p', { class: 'card-error', id: errorId, role: 'alert', 'data-testid': 'prompt-error' }));

  authorizeForm.addEventListener('submit', (event) => {
    event.preventDefault();
    decide(card, view, 'authorize', codeInput);
  });
  rejectForm.addEventListener('submit', (event) => {
    event.preventDefault();
    decide(card, view, 'reject', reasonInput);
  });
  return card;
}

async function decide(card, view, action, input) {
  if (card.classList.contains('is-expired') || card.getAttribute('aria-busy') === 'true') return;
  const error = $('.card-error', card);
  setMsg(error, '');
  input.removeAttribute('aria-invalid');
  const transactionId = view.transaction_id;
  try {
    await withBusy(card, async () => {
      if (action === 'authorize') {
        const mfaCode = readCode(input);
        await api('POST', '/api/authorize_transaction', { transaction_id: transactionId, mfa_code: mfaCode });
        announce(`Authorized: ${view.summary}. The agent can now execute it.`, 'ok');
      } else {
        const reason = input.value.trim();
        await api('POST', '/api/reject_transaction',
          reason ? { transaction_id: transactionId, reason } : { transaction_id: transactionId });
        announce(`Rejected: ${view.summary}.`, 'ok');
      }
    });
    // Until the new view arrives the card stays, done but inert.
    card.classList.add('is-decided');
    keepFocusOut(card, $('#inbox-heading'));
    setControlsDisabled($('.decisions', card), true);
    setMsg(error, action === 'authorize' ? 'Authorized.' : 'Rejected.', 'ok');
    await refreshTransaction(transactionId, 0, { quiet: true });
  } catch (err) {
    if (err instanceof StaleError) return;
    showCardError(card, err, input);
    if (['invalid_state', 'transaction_expired', 'not_found'].includes(err.code)) refreshTransaction(transactionId);
  }
}

function showCardError(card, err, input) {
  setMsg($('.card-error', card), describeError(err), 'error');
  const codeProblem = err.field === 'mfa_code' || ['invalid_mfa_code', 'mfa_code_replayed'].includes(err.code);
  if (codeProblem || err.field === input.name) {
    if (err.code === 'mfa_code_replayed') input.value = '';
    input.setAttribute('aria-invalid', 'true');
    input.focus();
    input.select();
  }
}

function tickCountdowns() {
  const now = Date.now() + serverOffsetMs;
  for (const card of nodes.prompts.values()) updateCountdown(card, now);
}

function updateCountdown(card, now = Date.now() + serverOffsetMs) {
  const expiresAt = Number(card.dataset.expiresAt);
  if (!Number.isFinite(expiresAt)) return;
  const left = Math.ceil((expiresAt - now) / 1000);
  if (left > 0) {
    $('.countdown-value', card).textContent = formatCountdown(left);
    card.classList.toggle('is-urgent', left <= 60);
    return;
  }
  if (!card.classList.contains('is-expired')) expireCard(card);
  // Kept disabled on every tick: a request that was in flight at expiry re-enables its buttons.
  setControlsDisabled($('.decisions', card), true);
}

// Disabling the focused control would drop focus to <body>; move it somewhere sensible first.
function keepFocusOut(card, target) {
  if (card.contains(document.activeElement)) target.focus();
}

function expireCard(card) {
  keepFocusOut(card, $('.prompt-summary', card));
  card.classList.add('is-expired');
  card.classList.remove('is-urgent');
  $('.countdown-label', card).hidden = true;
  $('.countdown-value', card).textContent = 'expired';
  $('.countdown-sr', card).textContent = 'This request has expired.';
  updateInboxCount();
  // The server records the expiry within moments; fetch it in case no socket is open.
  const id = card.dataset.transactionId;
  setTimeout(() => { if (nodes.prompts.get(id) === card) refreshTransaction(id); }, 3000);
}

/* --- activity */

function renderActivityRow(view) {
  let row = nodes.rows.get(view.transaction_id);
  if (!row) {
    row = buildActivityRow(view);
    nodes.rows.set(view.transaction_id, row);
    insertByCreated($('#activity-list'), row, parseTime(view.created_at));
  }
  updateActivityRow(row, view);
  $('#activity-empty').hidden = true;
}

function buildActivityRow(view) {
  const id = view.transaction_id;
  const historyId = `h-${id}`;
  const toggle = el('button', {
    type: 'button', class: 'tx-toggle', 'aria-expanded': 'false', 'aria-controls': historyId,
  },
  el('span', { class: 'badge', 'data-testid': 'tx-status', 'data-transaction-id': id }),
  el('span', { class: 'tx-summary' }),
  el('span', { class: 'tx-meta' }));
  const row = el('li', { class: 'tx', 'data-tx': id },
    toggle,
    el('div', { class: 'tx-details' }),
    el('div', { class: 'tx-history', id: historyId, hidden: true }));
  toggle.addEventListener('click', () => toggleHistory(row));
  return row;
}

function updateActivityRow(row, view) {
  const badge = $('[data-testid="tx-status"]', row);
  const known = Object.prototype.hasOwnProperty.call(STATUS_LABELS, view.status);
  badge.textContent = statusLabel(view.status);
  badge.className = `badge tx-badge status-${known ? view.status : 'unknown'}`;
  badge.dataset.status = view.status;
  $('.tx-summary', row).textContent = view.summary;
  $('.tx-meta', row).replaceChildren(timeEl(view.created_at), ` · by ${initiatorName(view)}`);
  $('.tx-details', row).replaceChildren(...txDetails(view));
  if (row.classList.contains('is-open')) loadHistory(row);
}

function txDetails(view) {
  const lines = [];
  if (view.tx_hash) {
    const hash = el('code', { class: 'hash', 'data-testid': 'tx-hash', 'data-transaction-id': view.transaction_id }, view.tx_hash);
    lines.push(el('p', { class: 'tx-line copy-row' },
      el('span', { class: 'tx-line-label' }, 'Tx hash'), hash, copyButton(view.tx_hash, hash, 'Copy transaction hash')));
  }
  if (view.status === 'pending_authorization') {
    lines.push(el('p', { class: 'tx-line' }, el('a', { href: '#inbox' }, 'Waiting for your decision in the inbox')));
  }
  if (view.rejection_reason) lines.push(el('p', { class: 'tx-line' }, 'Reason: ', view.rejection_reason));
  if (view.failure_reason) lines.push(el('p', { class: 'tx-line' }, 'Failure: ', view.failure_reason));
  if (view.block_number !== null && view.block_number !== undefined) {
    const gas = view.gas_used !== null && view.gas_used !== undefined ? ` · gas used ${view.gas_used}` : '';
    lines.push(el('p', { class: 'tx-line muted' }, `Block ${view.block_number}${gas}`));
  }
  return lines;
}

function toggleHistory(row) {
  const open = !row.classList.contains('is-open');
  row.classList.toggle('is-open', open);
  $('.tx-toggle', row).setAttribute('aria-expanded', String(open));
  $('.tx-history', row).hidden = !open;
  if (open) loadHistory(row);
}

async function loadHistory(row) {
  const box = $('.tx-history', row);
  if (!box.firstChild) box.append(el('p', { class: 'muted' }, 'Loading history…'));
  try {
    const res = await api('GET', `/api/transactions/${encodeURIComponent(row.dataset.tx)}/events`);
    box.replaceChildren(historyTable(Array.isArray(res.events) ? res.events : []));
  } catch (err) {
    if (err instanceof StaleError) return;
    const retry = el('button', { type: 'button', class: 'quiet' }, 'Try again');
    retry.addEventListener('click', () => loadHistory(row));
    box.replaceChildren(el('p', { class: 'msg', 'data-kind': 'error' }, `Couldn't load the history: ${describeError(err)}`), retry);
  }
}

function historyTable(events) {
  if (!events.length) return el('p', { class: 'muted' }, 'No events recorded.');
  const head = el('tr', {}, ['Position', 'Time', 'Event', 'By'].map((h) => el('th', { scope: 'col' }, h)));
  const body = events.map((event) => el('tr', { 'data-testid': 'tx-event' },
    el('td', { class: 'num' }, String(event.position)),
    el('td', {}, timeEl(event.recorded_at, preciseFormat)),
    el('td', { class: 'event-type' }, String(event.event_type)),
    el('td', {}, actorLabel(event))));
  return el('div', { class: 'table-wrap', tabindex: '0', role: 'region', 'aria-label': 'Event history' },
    el('table', { class: 'history', 'data-testid': 'tx-history' },
      el('thead', {}, head),
      el('tbody', {}, body)));
}

/* ------------------------------------------------------------------ live updates */

function setConn(state) {
  live.status = state;
  const node = $('#conn');
  node.dataset.state = state;
  $('#conn-text').textContent = CONN_TEXT[state];
}

function connectLive() {
  if (!session.token || live.ws || live.connecting) return;
  clearTimeout(live.timer);
  live.connecting = true;
  const id = ++live.connectId;
  openSocket(id)
    .catch(() => { if (id === live.connectId) scheduleReconnect(); })
    .finally(() => { if (id === live.connectId) live.connecting = false; });
}

async function openSocket(id) {
  setConn(live.attempt > 0 ? 'reconnecting' : 'connecting');
  let ticket = null;
  try {
    const res = await api('POST', '/api/ws_ticket', {});
    ticket = typeof res.ticket === 'string' ? res.ticket : null;
  } catch (err) {
    if (err instanceof StaleError) return;
  }
  if (id !== live.connectId) return;
  if (!ticket) {
    scheduleReconnect();
    return;
  }
  const scheme = location.protocol === 'https:' ? 'wss://' : 'ws://';
  const after = live.lastPosition ? `&after=${live.lastPosition}` : '';
  const ws = new WebSocket(`${scheme}${location.host}/api/ws?ticket=${encodeURIComponent(ticket)}${after}`);
  live.ws = ws;
  live.positionAtConnect = live.lastPosition;
  ws.addEventListener('message', (event) => { if (live.ws === ws) onLiveMessage(event.data); });
  ws.addEventListener('close', (event) => onLiveClose(ws, event));
}

function onLiveMessage(raw) {
  let message;
  try {
    message = JSON.parse(raw);
  } catch {
    return;
  }
  if (!message || typeof message !== 'object') return;
  const position = Number(message.position);
  if (Number.isSafeInteger(position) && position > live.lastPosition) live.lastPosition = position;
  if (message.type === 'caught_up') {
    live.attempt = 0;
    setConn('live');
    return;
  }
  if (message.type !== 'event' || typeof message.transaction_id !== 'string') return;
  const known = store.txs.get(message.transaction_id);
  if (BALANCE_EVENTS.has(message.event_type)) scheduleWalletRefresh();
  // Replays after a reconnect repeat events the screen already shows.
  if (known && Number(known.position) >= position) return;
  refreshTransaction(message.transaction_id, Number.isSafeInteger(position) ? position : 0);
}

function onLiveClose(ws, event) {
  if (live.ws !== ws) return; // replaced or closed on purpose
  live.ws = null;
  if (!session.token) return;
  if (event.code === 4001) {
    expireSession('Your session has expired. Please log in again.');
    return;
  }
  if (event.code === 4003) {
    // A session ended (logout, password change, MFA replacement). If it was not this page's
    // current token (already renewed), reconnect; if it was, the check signs the page out.
    api('GET', '/api/me').then(
      () => scheduleReconnect(true),
      (err) => { if (!(err instanceof StaleError)) scheduleReconnect(); },
    );
    return;
  }
  // 4008: the server dropped us for reading too slowly; resuming at once loses nothing, but
  // only while each round makes progress, so a persistent problem still backs off.
  const progressed = live.lastPosition > live.positionAtConnect;
  scheduleReconnect(event.code === 4008 && progressed);
}

function scheduleReconnect(immediate = false) {
  if (!session.token) return;
  clearTimeout(live.timer);
  const delay = immediate ? 0 : Math.min(30000, 1000 * 2 ** Math.min(live.attempt, 5));
  if (!immediate) live.attempt += 1;
  setConn('reconnecting');
  live.timer = setTimeout(connectLive, delay);
}

function stopLive() {
  live.connectId += 1;
  live.connecting = false;
  clearTimeout(live.timer);
  const ws = live.ws;
  live.ws = null;
  if (ws) ws.close(1000, 'signed out');
  live.attempt = 0;
  setConn('offline');
}

function reconnectNow() {
  if (!session.token || live.ws || live.connecting) return;
  clearTimeout(live.timer);
  live.attempt = 0;
  connectLive();
}

/* ------------------------------------------------------------------ start-up */

async function refreshButton(button, load) {
  await withBusy(button.parentElement, load);
}

function init() {
  for (const fieldset of $$('#auth-view fieldset')) fieldset.disabled = false;

  onSubmit($('#login-form'), submitLogin);
  onSubmit($('#register-form'), submitRegister);
  onSubmit($('#wallet-form'), submitCreateWallet);
  onSubmit($('#key-form'), submitIssueKey);
  onSubmit($('#bulk-form'), submitAuthorizeAll);
  onSubmit($('#mfa-start-form'), submitMfaStart);
  onSubmit($('#mfa-confirm-form'), submitMfaConfirm);

  $('#logout-btn').addEventListener('click', logout);
  $('#activity-refresh').addEventListener('click', (e) => refreshButton(e.currentTarget, loadTransactions));
  $('#wallets-refresh').addEventListener('click', (e) => refreshButton(e.currentTarget, loadWallets));
  $('#mfa-replace-btn').addEventListener('click', startMfaReplace);
  $('#mfa-cancel-btn').addEventListener('click', cancelMfaReplace);
  $('#mfa-restart-btn').addEventListener('click', restartMfa);
  $('#new-key-copy').addEventListener('click', (e) => {
    const value = $('#new-key-value');
    copyText(value.textContent, value, e.currentTarget);
  });
  $('#new-key-done').addEventListener('click', () => {
    hideNewKey();
    $('#keys-heading').focus();
  });
  $('#mfa-secret-copy').addEventListener('click', (e) => {
    const secret = $('#mfa-secret');
    copyText(secret.textContent, secret, e.currentTarget);
  });

  // The floating message also clears itself; clicking it just makes way sooner.
  $('#status').addEventListener('click', () => setMsg($('#status'), ''));
  window.addEventListener('online', reconnectNow);
  setInterval(tickCountdowns, 1000);
  $('#login-username').focus();
}

init();
