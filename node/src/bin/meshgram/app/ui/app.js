// The Meshgram app's UI: one ES module, no framework, no build step. It talks to the profile's
// client node through the app's local API (/api/call takes the node's calls as the control
// socket does; /api/events streams its events). Every text from the network goes into the page
// as text (textContent), never as markup.

const $ = (selector, root = document) => root.querySelector(selector);

/** Makes an element: h('button', {onclick, 'aria-label': 'Send'}, 'Send'). */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith('on')) el.addEventListener(key.slice(2), value);
    else if (key === 'class') el.className = value;
    else if (key in el && typeof value !== 'string') el[key] = value;
    else el.setAttribute(key, value === true ? '' : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

/** Icons drawn as strokes (no icon font, no emoji font needed): inner SVG markup, constants only. */
const ICONS = {
  compose: '<path d="M4 20h4L19 9l-4-4L4 16z"/><path d="M13 7l4 4"/>',
  group: '<circle cx="9" cy="8" r="3.5"/><path d="M2.5 20c0-4 3-6.5 6.5-6.5s6.5 2.5 6.5 6.5"/><circle cx="17" cy="9" r="2.5"/><path d="M17.5 14c2.5.4 4 2.6 4 5.5"/>',
  channel: '<path d="M3 10v4h4l7 5V5L7 10z"/><path d="M17 9a4 4 0 0 1 0 6"/>',
  link: '<path d="M10 14a4 4 0 0 0 5.7 0l3-3a4 4 0 0 0-5.7-5.7l-1 1"/><path d="M14 10a4 4 0 0 0-5.7 0l-3 3a4 4 0 0 0 5.7 5.7l1-1"/>',
  settings: '<circle cx="12" cy="12" r="3"/><path d="M12 2v3M12 19v3M2 12h3M19 12h3M4.9 4.9 7 7M17 17l2.1 2.1M4.9 19.1 7 17M17 7l2.1-2.1"/>',
  attach: '<path d="M21 11l-8.5 8.5a5 5 0 0 1-7-7L14 4a3.5 3.5 0 0 1 5 5l-8.5 8.5a2 2 0 0 1-3-3L15 7"/>',
  lock: '<rect x="5" y="11" width="14" height="10" rx="2"/><path d="M8 11V7a4 4 0 0 1 8 0v4"/>',
  info: '<circle cx="12" cy="12" r="9"/><path d="M12 11v6M12 7.5v.5"/>',
  key: '<circle cx="8" cy="15" r="4"/><path d="M11 12l9-9M17 6l3 3M15 8l2 2"/>',
  close: '<path d="M6 6l12 12M18 6L6 18"/>',
  reply: '<path d="M10 8V4L3 11l7 7v-4c5 0 8 1.5 11 5-1-6-4-10-11-11z"/>',
  trash: '<path d="M4 7h16M10 11v6M14 11v6M6 7l1 13h10l1-13M9 7V4h6v3"/>',
  back: '<path d="M19 12H5M11 18l-6-6 6-6"/>',
  clock: '<circle cx="12" cy="12" r="8"/><path d="M12 8v4l3 2"/>',
  file: '<path d="M6 3h8l4 4v14H6z"/><path d="M14 3v4h4"/>',
};

function icon(name) {
  const svg = document.createElementNS('http://www.w3.org/2000/svg', 'svg');
  svg.setAttribute('viewBox', '0 0 24 24');
  svg.setAttribute('aria-hidden', 'true');
  svg.setAttribute('class', 'icon');
  svg.innerHTML = ICONS[name];
  return svg;
}

// --- the local API ----------------------------------------------------------------------------

class ApiError extends Error {
  constructor(error, status) {
    super(error.message || error.code);
    this.code = error.code;
    this.status = status;
    this.retryAfter = error.retry_after;
  }
}

async function request(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { credentials: 'same-origin', ...options });
  } catch (e) {
    throw new ApiError({ code: 'APP_GONE', message: 'The app is not answering (was `meshgram app` stopped?)' }, 0);
  }
  const text = await response.text();
  let body;
  try {
    body = JSON.parse(text, exactIds);
  } catch {
    body = { error: { code: 'BAD_ANSWER', message: `HTTP ${response.status}` } };
  }
  if (body.error) throw new ApiError(body.error, response.status);
  return body.ok;
}

/**
 * Ids past 2^53 (session ids, groups' chat numbers) stay exact: read as their digits (a
 * string), where a number would round. Sent back with `rawNumber`.
 */
function exactIds(key, value, context) {
  return typeof value === 'number' && !Number.isSafeInteger(value) && context?.source ? context.source : value;
}

/** A number given as its digits, written into a request as a JSON number. */
const rawNumber = (digits) => ({ toJSON: () => JSON.rawJSON(String(digits)) });

const post = (path, value) =>
  request(path, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(value) });

/** One call to the client node: {call: 'send', ...}. */
const call = (name, fields = {}) => post('/api/call', { call: name, ...fields });

/** A chat as the node's calls take it, from what a person types: @name, +phone, a user id, a group id. */
function queryOf(text) {
  const t = text.trim();
  if (/^g[0-9a-f]{32}$/i.test(t)) return { Group: t };
  if (t.startsWith('+')) return { Phone: t };
  if (/^\d+$/.test(t)) return { UserId: Number(t) };
  return { Username: t.replace(/^@/, '') };
}

// --- state ------------------------------------------------------------------------------------

const S = {
  me: null,
  chats: [],
  secretChats: [],
  names: new Map(),
  /** The open chat: {kind: 'private'|'group'|'channel'|'secret', chat, id, title, query, secret}. */
  current: null,
  messages: [],
  secretMessages: [],
  /** No earlier messages to page in (the whole chat is loaded). */
  complete: false,
  loadingEarlier: false,
  replyTo: null,
  editing: null,
  typing: new Map(),
  lastTypingSent: 0,
  search: '',
  connected: true,
  groups: new Map(),
};

/** Messages fetched at a time: a chat opens with its newest page, older ones come as you scroll. */
const PAGE = 100;
/** The most messages in the page at once. */
const WINDOW = 300;

const nameOf = (user) => (S.me && user === S.me.account.user_id ? 'You' : S.names.get(user) || `user ${user}`);

function learnNames(pairs) {
  for (const [id, name] of pairs || []) S.names.set(id, name);
}

// --- feedback ---------------------------------------------------------------------------------

let toastTimer;
function toast(text) {
  const el = $('#toast');
  el.textContent = text;
  el.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { el.hidden = true; }, 5000);
}

function failed(e) {
  const wait = e.retryAfter ? ` (try again in ${e.retryAfter} s)` : '';
  toast(`${e.message || e}${wait}`);
}

/** The line across the top while something is wrong; `detail` (the node's words) as its tooltip. */
function banner(text, detail) {
  const el = $('#banner');
  el.textContent = text || '';
  el.title = detail || '';
  el.hidden = !text;
}

const OFFLINE = 'Can’t reach the relays: messages wait here and go out once they are back. Retrying…';

// --- sign in ----------------------------------------------------------------------------------

function renderSignIn(state) {
  const root = $('#root');
  root.replaceChildren();
  root.setAttribute('aria-busy', 'false');
  const error = h('p', { class: 'error', role: 'alert' });
  const phone = h('input', { id: 'phone', type: 'tel', autocomplete: 'tel', placeholder: '+15550000001', required: true });
  const code = h('input', { id: 'code', inputmode: 'numeric', autocomplete: 'one-time-code' });
  const password = h('input', { id: 'password', type: 'password', autocomplete: 'current-password' });
  const codeRow = h('div', { class: 'field', hidden: true }, h('label', { for: 'code' }, 'Code'), code);
  const passwordRow = h('div', { class: 'field', hidden: true }, h('label', { for: 'password' }, 'Password'), password);
  const submit = h('button', { type: 'submit', class: 'primary' }, 'Send code');
  let step = 'phone';
  const form = h('form', {
    class: 'card signin',
    'aria-label': 'Sign in',
    onsubmit: async (event) => {
      event.preventDefault();
      error.textContent = '';
      submit.disabled = true;
      try {
        if (step === 'phone') {
          const sent = await post('/api/login/code', { phone: phone.value });
          step = 'code';
          codeRow.hidden = false;
          code.required = true;
          submit.textContent = 'Sign in';
          error.textContent = '';
          $('#hint').textContent = `A code was sent to ${phone.value}; it is valid for ${sent.expires_in_secs} s.`;
          code.focus();
        } else {
          await post('/api/login/sign_in', { phone: phone.value, code: code.value, password: password.value || null });
          await start();
        }
      } catch (e) {
        if (e.code === 'SESSION_PASSWORD_NEEDED') {
          passwordRow.hidden = false;
          error.textContent = 'This account has a password (two-step verification): enter it.';
          password.focus();
        } else {
          error.textContent = e.message + (e.retryAfter ? ` (try again in ${e.retryAfter} s)` : '');
        }
      } finally {
        submit.disabled = false;
      }
    },
  },
  h('h1', {}, 'Sign in to Meshgram'),
  h('p', { id: 'hint' }, state.can_sign_in ? 'Your phone number, in international form.' :
    'This app does not know the network: start it with `meshgram app --network FILE`.'),
  h('div', { class: 'field' }, h('label', { for: 'phone' }, 'Phone number'), phone),
  codeRow, passwordRow, error, submit);
  root.append(form);
  phone.focus();
}

// --- the main screen ----------------------------------------------------------------------------

function renderMain() {
  const root = $('#root');
  root.setAttribute('aria-busy', 'false');
  const search = h('input', {
    id: 'search', type: 'search', 'aria-label': 'Search', placeholder: 'Search (Ctrl+K)',
    oninput: () => { S.search = search.value.toLowerCase(); renderChatList(); },
  });
  const sidebar = h('nav', { class: 'sidebar', 'aria-label': 'Chats and tools' },
    h('div', { class: 'toolbar' },
      h('button', { onclick: newChatDialog, 'aria-label': 'New chat', title: 'New chat' }, icon('compose')),
      h('button', { onclick: newGroupDialog, 'aria-label': 'New group', title: 'New group' }, icon('group')),
      h('button', { onclick: newChannelDialog, 'aria-label': 'New channel', title: 'New channel' }, icon('channel')),
      h('button', { onclick: joinDialog, 'aria-label': 'Join with a link', title: 'Join with a link' }, icon('link')),
      h('button', { onclick: settingsDialog, 'aria-label': 'Settings', title: 'Settings' }, icon('settings'))),
    search,
    h('ul', { id: 'chats', role: 'list', 'aria-label': 'Chats' }));
  const pane = h('section', { id: 'pane', 'aria-label': 'Chat' },
    h('p', { class: 'center muted' }, 'Choose a chat, or start a new one.'));
  root.replaceChildren(sidebar, pane);
  renderChatList();
}

function chatEntries() {
  const entries = S.chats.map((c) => ({
    kind: c.kind === 'group' ? (S.groups.get(c.id)?.kind || 'group') : 'private',
    chat: c.chat, id: c.id, title: c.name, unread: c.unread, mentions: c.mentions,
    last: c.last, query: c.kind === 'group' ? { Group: c.id } : { UserId: c.chat },
  }));
  for (const s of S.secretChats) {
    if (s.state === 'closed' || s.state === 'declined') continue;
    entries.push({
      kind: 'secret', chat: s.peer, id: s.id, secret: s, title: nameOf(s.peer), unread: 0,
      last: null, query: { UserId: s.peer }, state: s.state,
    });
  }
  entries.sort((a, b) => (b.last?.sent_at_ms || b.secret?.created_at * 1000 || 0) - (a.last?.sent_at_ms || a.secret?.created_at * 1000 || 0));
  return entries.filter((e) => !S.search || e.title.toLowerCase().includes(S.search) ||
    (e.last && e.last.text.toLowerCase().includes(S.search)));
}

function preview(message) {
  if (!message) return '';
  if (message.deleted) return 'Deleted message';
  if (message.file) return `[${message.file.mime.split('/')[0] === 'image' ? 'photo' : 'file'}] ${message.text || message.file.name}`;
  return message.text;
}

/** Re-renders `list` with `render()`, keeping the keyboard's focus on the same item (its data-key). */
function keepingFocus(list, render) {
  const focused = list.contains(document.activeElement) ? document.activeElement : null;
  const item = focused?.closest('[data-key]')?.dataset.key;
  const label = focused?.getAttribute('aria-label');
  render();
  if (!item) return;
  const again = list.querySelector(`[data-key="${CSS.escape(item)}"]`);
  const target = again && ([...again.querySelectorAll('button')].find((b) => b.getAttribute('aria-label') === label) || again.querySelector('button'));
  target?.focus();
}

function renderChatList() {
  const list = $('#chats');
  if (!list) return;
  keepingFocus(list, () => renderChatItems(list));
}

function renderChatItems(list) {
  const entries = chatEntries();
  list.replaceChildren(...entries.map((e) => {
    const selected = S.current && S.current.kind === e.kind && S.current.id === e.id;
    const badge = e.unread ? h('span', { class: 'badge', 'aria-label': `${e.unread} unread` }, e.unread) :
      e.state === 'incoming' ? h('span', { class: 'badge' }, 'new') : null;
    return h('li', { 'data-key': `${e.kind}:${e.id}` },
      h('button', {
        class: selected ? 'chat selected' : 'chat', 'aria-current': selected ? 'true' : null,
        'aria-label': `${e.kind === 'secret' ? 'Secret chat with ' : ''}${e.title}${e.unread ? `, ${e.unread} unread` : ''}`,
        onclick: () => openChat(e),
      },
      h('span', { class: 'avatar', 'aria-hidden': 'true' }, initials(e.title)),
      h('span', { class: 'summary' },
        h('span', { class: 'title' }, e.kind === 'secret' ? icon('lock') : null, e.title),
        h('span', { class: 'last' }, e.kind === 'secret' ? `secret chat · ${e.state}` : preview(e.last))),
      badge));
  }));
  if (!entries.length) list.append(h('li', { class: 'muted pad' }, S.search ? 'No chat matches.' : 'No chats yet.'));
}

function initials(title) {
  const letters = title.replace(/\(.*\)/gu, '').replace(/[^\p{L}\p{N} ]/gu, '').trim().split(/\s+/).map((w) => w[0] || '');
  return (letters.slice(0, 2).join('') || '#').toUpperCase();
}

async function loadChats() {
  const [chats, secret, groups] = await Promise.all([call('chats'), call('secret_list'), call('group_list')]);
  learnNames(chats.names);
  S.chats = chats.chats;
  S.secretChats = secret.chats;
  for (const g of groups.groups) S.groups.set(g.id, g);
  const open = S.current && S.groups.get(S.current.id);
  if (open?.title && open.title !== S.current.title) {
    S.current.title = open.title;
    renderPaneHeader();
  }
  renderChatList();
}

let chatsTimer;
function reloadChatsSoon() {
  clearTimeout(chatsTimer);
  chatsTimer = setTimeout(() => loadChats().catch(failed), 150);
}

// --- one chat -----------------------------------------------------------------------------------

async function openChat(entry) {
  S.current = entry;
  S.messages = [];
  S.secretMessages = [];
  S.complete = false;
  S.winStart = 0;
  S.winEnd = undefined;
  S.replyTo = null;
  S.editing = null;
  document.body.classList.add('chat-open');
  renderPane();
  renderChatList();
  await loadMessages();
  $('#composer-text')?.focus();
}

async function loadMessages() {
  const current = S.current;
  if (!current) return;
  try {
    // The newest page again (with what changed in it); what was paged in before it stays. A
    // hidden tab reads without marking read: receipts go out when the reader looks.
    const limit = PAGE;
    const reply = await call(document.hidden ? 'history' : 'messages', { chat: current.query, limit, before: null });
    if (S.current !== current) return;
    learnNames(reply.names);
    if (current.kind === 'secret') {
      const info = await call('secret_info', { chat: current.id });
      current.secret = info.chat;
      S.secretMessages = reply.secret.filter((m) => m.chat === current.id);
      renderPaneHeader();
    } else {
      const first = reply.messages.length ? reply.messages[0].id : null;
      const overlap = first ? S.messages.findIndex((m) => m.id === first) : -1;
      if (overlap >= 0) {
        S.messages = S.messages.slice(0, overlap).concat(reply.messages);
      } else {
        S.messages = reply.messages;
        S.complete = reply.messages.length < limit;
      }
    }
    renderMessages();
    const entry = S.chats.find((c) => c.id === current.id);
    if (entry && entry.unread && !document.hidden) { entry.unread = 0; renderChatList(); }
  } catch (e) {
    failed(e);
  }
}

/** Pages in the messages before the first one loaded; true when some came. */
async function loadEarlier() {
  const current = S.current;
  if (!current || S.complete || S.loadingEarlier || !S.messages.length) return false;
  S.loadingEarlier = true;
  try {
    const reply = await call('history', { chat: current.query, before: S.messages[0].id, limit: PAGE });
    if (S.current !== current) return false;
    learnNames(reply.names);
    S.messages = reply.messages.concat(S.messages);
    S.winStart += reply.messages.length;
    S.winEnd += reply.messages.length;
    S.complete = reply.messages.length < PAGE;
    return reply.messages.length > 0;
  } catch (e) {
    failed(e);
    return false;
  } finally {
    S.loadingEarlier = false;
  }
}

let messagesTimer;
function reloadMessagesSoon() {
  clearTimeout(messagesTimer);
  messagesTimer = setTimeout(loadMessages, 100);
}

function renderPane() {
  const c = S.current;
  const text = h('textarea', {
    id: 'composer-text', rows: 1, 'aria-label': 'Message', placeholder: c.kind === 'channel' && !S.groups.get(c.id)?.admin ? 'Only admins post here' : 'Message',
    disabled: c.kind === 'channel' && !S.groups.get(c.id)?.admin,
    onkeydown: (event) => {
      if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        send();
      } else if (event.key === 'Escape') {
        cancelReplyEdit();
      }
    },
    oninput: () => { autoGrow(text); sendTyping(); },
  });
  const file = h('input', { id: 'attach-file', type: 'file', hidden: true, onchange: () => { for (const f of file.files) upload(f); file.value = ''; } });
  const pane = $('#pane');
  pane.replaceChildren(
    h('header', { class: 'chat-header', id: 'chat-header' }),
    h('ol', {
      id: 'messages', role: 'log', 'aria-label': 'Messages', 'aria-live': 'polite',
      onscroll: onMessagesScroll,
    }, h('li', { class: 'center muted' }, 'Loading…')),
    h('div', { id: 'reply-keyboard', role: 'group', 'aria-label': 'Bot keyboard', hidden: true }),
    h('div', { id: 'context', hidden: true }),
    h('div', { id: 'progress-row', hidden: true },
      h('progress', { id: 'progress', max: 100, value: 0, 'aria-label': 'Upload progress' }),
      h('span', { id: 'progress-text' })),
    h('form', { class: 'composer', onsubmit: (event) => { event.preventDefault(); send(); } },
      h('button', { type: 'button', 'aria-label': 'Attach', title: 'Attach a photo or file', onclick: () => file.click() }, icon('attach')),
      file, text,
      h('button', { type: 'submit', class: 'primary', 'aria-label': 'Send' }, 'Send')));
  pane.ondragover = (event) => { event.preventDefault(); pane.classList.add('dropping'); };
  pane.ondragleave = () => pane.classList.remove('dropping');
  pane.ondrop = (event) => {
    event.preventDefault();
    pane.classList.remove('dropping');
    for (const f of event.dataTransfer.files) upload(f);
  };
  renderPaneHeader();
}

function autoGrow(textarea) {
  textarea.style.height = 'auto';
  textarea.style.height = `${Math.min(textarea.scrollHeight, 200)}px`;
}

function renderPaneHeader() {
  const c = S.current;
  const header = $('#chat-header');
  if (!c || !header) return;
  const typing = c.kind === 'private' && (S.typing.get(c.chat) || 0) > Date.now();
  const group = S.groups.get(c.id);
  let status = '';
  if (typing) status = 'typing…';
  else if (c.kind === 'group' && group) status = `${group.members.length} members`;
  else if (c.kind === 'channel' && group) status = `channel · ${group.subscribers} subscribers`;
  else if (c.kind === 'secret') status = `secret chat · ${c.secret.state}${c.secret.ttl_secs ? ` · self-destruct ${c.secret.ttl_secs} s` : ''}`;
  const actions = [];
  if (c.kind === 'private') {
    actions.push(h('button', { onclick: () => startSecret(c), 'aria-label': 'Start secret chat', title: 'Start secret chat' }, icon('lock')));
  }
  if (c.kind === 'group' || c.kind === 'channel') {
    actions.push(h('button', { onclick: () => groupDialog(c.id), 'aria-label': c.kind === 'group' ? 'Group info' : 'Channel info', title: 'Info' }, icon('info')));
  }
  if (c.kind === 'secret') {
    const s = c.secret;
    if (s.state === 'incoming') {
      actions.push(h('button', { onclick: () => secretAct('secret_accept', c), class: 'primary' }, 'Accept'));
      actions.push(h('button', { onclick: () => secretAct('secret_decline', c) }, 'Decline'));
    }
    if (s.state === 'active') {
      actions.push(h('button', { onclick: () => fingerprintDialog(c), 'aria-label': 'Encryption key', title: 'Encryption key' }, icon('key')));
      actions.push(h('label', { class: 'ttl' }, h('span', { class: 'ttl-label' }, 'Self-destruct '),
        h('select', { 'aria-label': 'Self-destruct timer', onchange: (event) => setTtl(c, event.target.value) },
          ...[['off', 'Off'], ['5', '5 s'], ['30', '30 s'], ['60', '1 min'], ['3600', '1 h'], ['86400', '1 day']].map(([v, t]) =>
            h('option', { value: v, selected: String(s.ttl_secs || 'off') === v }, t)))));
    }
    actions.push(h('button', { onclick: () => secretAct('secret_close', c), 'aria-label': 'Close secret chat', title: 'Close secret chat' }, icon('close')));
  }
  header.replaceChildren(
    h('button', { class: 'back', 'aria-label': 'Back to chats', onclick: () => { document.body.classList.remove('chat-open'); } }, icon('back')),
    h('div', { class: 'who' }, h('h2', {}, c.title), h('span', { class: 'muted', id: 'chat-status' }, status)),
    h('div', { class: 'actions' }, ...actions));
}

const statusMark = { pending: ['…', 'not sent yet'], sent: ['✓', 'sent'], delivered: ['✓✓', 'delivered'], read: ['✓✓', 'read'] };

function timeOf(ms) {
  return new Date(ms).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
}

/** The messages of the open chat, oldest first (loaded so far). */
const chatMessages = () => (S.current.kind === 'secret' ? S.secretMessages : S.messages);

/**
 * The message list is a window of at most WINDOW messages of those loaded: scrolling near
 * its top moves it back a page (paging older ones in from the node when needed), near its
 * bottom forward a page, so a chat of any length keeps a few hundred messages in the page.
 * A full render follows the newest messages when the reader is at the bottom, and otherwise
 * keeps the first message on screen where it was.
 */
function renderMessages() {
  const list = $('#messages');
  if (!list) return;
  const all = chatMessages();
  S.byId = new Map(all.map((m) => [m.id, m]));
  const following = S.winEnd === undefined || S.winEnd >= S.shownLength && list.scrollHeight - list.scrollTop - list.clientHeight < 80;
  let anchor = null;
  if (!following) {
    anchor = [...list.querySelectorAll('li.message')].find((li) => li.offsetTop + li.offsetHeight > list.scrollTop);
  }
  const anchorOffset = anchor ? anchor.offsetTop - list.scrollTop : 0;
  if (following) {
    S.winEnd = all.length;
    S.winStart = Math.max(0, all.length - WINDOW);
  } else {
    const at = anchor ? all.findIndex((m) => m.id === anchor.dataset.id) : -1;
    if (at >= 0) { S.winStart = Math.max(0, at - PAGE); S.winEnd = Math.min(all.length, S.winStart + WINDOW); }
  }
  S.shownLength = all.length;
  const items = all.slice(S.winStart, S.winEnd).map((m) => renderMessage(m, S.byId, S.current.kind === 'secret'));
  if (!all.length) {
    const secret = S.current.kind === 'secret' && S.current.secret.state !== 'active';
    items.push(h('li', { class: 'center muted' }, secret ? `Secret chat ${S.current.secret.state}.` : 'No messages yet.'));
  }
  keepingFocus(list, () => list.replaceChildren(earlierButton(), ...items));
  if (following) {
    list.scrollTop = list.scrollHeight;
  } else if (anchor) {
    const again = list.querySelector(`li[data-id="${anchor.dataset.id}"]`);
    if (again) list.scrollTop = again.offsetTop - anchorOffset;
  }
  renderReplyKeyboard();
}

function earlierButton() {
  return h('li', { class: 'more', hidden: !hasEarlier() }, h('button', { onclick: () => windowBack() }, 'Show earlier messages'));
}

let windowMoving = false;

/** Moves the window a page back: older messages in at the top, the newest of it out. */
async function windowBack() {
  const list = $('#messages');
  if (windowMoving || !list) return;
  windowMoving = true;
  try {
    if (S.winStart === 0 && !(await loadEarlier())) return;
    const all = chatMessages();
    const from = Math.max(0, S.winStart - PAGE);
    for (const m of all.slice(from, S.winStart)) S.byId.set(m.id, m);
    const added = all.slice(from, S.winStart).map((m) => renderMessage(m, S.byId, S.current.kind === 'secret'));
    const before = list.scrollHeight;
    list.firstElementChild.after(...added);
    list.scrollTop += list.scrollHeight - before;
    S.winStart = from;
    while (S.winEnd - S.winStart > WINDOW) {
      list.lastElementChild.remove();
      S.winEnd -= 1;
    }
    list.firstElementChild.hidden = !hasEarlier();
  } finally {
    windowMoving = false;
  }
}

/** Moves the window a page forward, toward the newest messages. */
function windowForward() {
  const list = $('#messages');
  const all = chatMessages();
  if (!list || S.winEnd >= all.length) return;
  const to = Math.min(all.length, S.winEnd + PAGE);
  list.append(...all.slice(S.winEnd, to).map((m) => renderMessage(m, S.byId, S.current.kind === 'secret')));
  S.winEnd = to;
  const before = list.scrollHeight;
  while (S.winEnd - S.winStart > WINDOW) {
    list.firstElementChild.nextElementSibling.remove();
    S.winStart += 1;
  }
  list.scrollTop -= before - list.scrollHeight;
  list.firstElementChild.hidden = !hasEarlier();
}

/** Whether there are messages before the window: in the page's list, or still at the node. */
const hasEarlier = () => S.winStart > 0 || (S.current.kind !== 'secret' && !S.complete && S.messages.length > 0);

function onMessagesScroll(event) {
  const list = event.target;
  if (list.scrollTop < 400) windowBack();
  else if (list.scrollHeight - list.scrollTop - list.clientHeight < 400) windowForward();
}

function renderMessage(m, byId, secret) {
  const from = secret ? (m.outgoing ? S.me.account.user_id : m.peer) : m.from;
  const classes = ['message', m.outgoing ? 'out' : 'in'];
  if (m.notice) classes.push('notice');
  const parts = [];
  if (!m.outgoing && !m.notice && (S.current.kind === 'group' || S.current.kind === 'channel')) {
    parts.push(h('span', { class: 'author' }, nameOf(from)));
  }
  if (m.reply_to) {
    const quoted = byId.get(m.reply_to);
    parts.push(h('blockquote', { class: 'quote' }, quoted ? `${nameOf(secret ? (quoted.outgoing ? S.me.account.user_id : quoted.peer) : quoted.from)}: ${preview(quoted)}` : 'an earlier message'));
  }
  if (m.file && !m.deleted) parts.push(renderFile(m));
  const text = m.deleted ? 'This message was deleted.' : m.text;
  if (text) parts.push(h('p', { class: m.deleted ? 'text muted' : 'text' }, text));
  const markup = m.extras?.markup;
  if (markup?.inline && !m.deleted) {
    parts.push(h('div', { class: 'inline-keyboard', role: 'group', 'aria-label': 'Buttons' },
      ...markup.inline.rows.map((row) => h('div', { class: 'row' },
        ...row.map((b) => h('button', { onclick: () => press(m, b.text) }, b.text))))));
  }
  const meta = [timeOf(m.sent_at_ms)];
  if (m.edited && !m.deleted) meta.unshift('edited');
  if (m.expires_at_ms) meta.unshift(`⏱ ${Math.max(0, Math.round((m.expires_at_ms - Date.now()) / 1000))} s`);
  const mark = m.outgoing && statusMark[String(m.status).toLowerCase()];
  const actions = m.notice || m.deleted ? [] : [
    h('button', { 'aria-label': 'Reply', title: 'Reply', onclick: () => startReply(m) }, icon('reply')),
    !secret && m.outgoing && !m.file ? h('button', { 'aria-label': 'Edit', title: 'Edit', onclick: () => startEdit(m) }, icon('compose')) : null,
    !secret && m.outgoing ? h('button', { 'aria-label': 'Delete', title: 'Delete for everyone', onclick: () => remove(m) }, icon('trash')) : null,
  ];
  return h('li', { class: classes.join(' '), 'data-id': m.id, 'data-key': m.id },
    h('div', { class: 'bubble' }, ...parts,
      h('span', { class: 'meta' }, meta.join(' · '),
        mark ? h('span', { class: `status ${String(m.status).toLowerCase()}`, 'aria-label': mark[1], title: mark[1] }, ` ${mark[0]}`) : null)),
    h('div', { class: 'message-actions' }, ...actions));
}

function renderFile(m) {
  const f = m.file;
  const src = `/api/media/${m.id}`;
  if (f.mime.startsWith('image/') && f.mime !== 'image/svg+xml') {
    // The sender's small preview at once, then the picture once it is fetched.
    const img = h('img', { class: 'photo', alt: f.name, src: f.thumbnail && f.thumbnail.length ? `/api/thumb/${m.id}` : src });
    if (f.thumbnail && f.thumbnail.length) {
      const full = new Image();
      full.onload = () => { img.src = src; img.classList.add('loaded'); };
      full.src = src;
    }
    return h('a', { href: `${src}?download=true`, class: 'file-link', 'aria-label': `Photo ${f.name}, download`, download: f.name }, img);
  }
  if (f.mime.startsWith('video/')) {
    return h('video', { class: 'video', controls: true, preload: 'metadata', src, 'aria-label': `Video ${f.name}` });
  }
  if (f.mime.startsWith('audio/')) {
    return h('audio', { controls: true, preload: 'metadata', src, 'aria-label': `Audio ${f.name}` });
  }
  return h('a', { class: 'file', href: `${src}?download=true`, download: f.name, 'aria-label': `Download ${f.name}` },
    icon('file'), ` ${f.name} (${sizeOf(f.size)})`);
}

function sizeOf(bytes) {
  const units = ['B', 'KiB', 'MiB', 'GiB'];
  let i = 0;
  let n = bytes;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

/** The message whose reply keyboard is shown, and whether it is one-time. */
let keyboardOwner = null;

/** The reply keyboard of the chat's last bot message that set one, above the composer. */
function renderReplyKeyboard() {
  const row = $('#reply-keyboard');
  if (!row) return;
  let keyboard = null;
  let owner = null;
  for (const m of S.messages) {
    const markup = m.extras?.markup;
    if (!markup || m.outgoing) continue;
    if (markup.keyboard) { keyboard = markup.keyboard; owner = m; }
    if (markup === 'remove_keyboard') { keyboard = null; }
  }
  // A one-time keyboard goes once one of its buttons was pressed.
  if (keyboard && keyboard.one_time && S.keyboardUsed === owner.id) keyboard = null;
  keyboardOwner = keyboard ? { id: owner.id, one_time: keyboard.one_time } : null;
  row.hidden = !keyboard;
  if (!keyboard) { row.replaceChildren(); return; }
  row.replaceChildren(...keyboard.rows.map((r) => h('div', { class: 'row' },
    ...r.map((text) => h('button', { onclick: () => press(owner, text) }, text)))));
}

function renderContext() {
  const el = $('#context');
  if (!el) return;
  const m = S.editing || S.replyTo;
  el.hidden = !m;
  if (!m) { el.replaceChildren(); return; }
  el.replaceChildren(
    h('span', {}, S.editing ? 'Editing: ' : 'Replying to: ', preview(m)),
    h('button', { 'aria-label': S.editing ? 'Cancel editing' : 'Cancel reply', onclick: cancelReplyEdit }, icon('close')));
}

function startReply(m) {
  S.replyTo = m;
  S.editing = null;
  renderContext();
  $('#composer-text').focus();
}

function startEdit(m) {
  S.editing = m;
  S.replyTo = null;
  const text = $('#composer-text');
  text.value = m.text;
  renderContext();
  text.focus();
}

function cancelReplyEdit() {
  if (S.editing) $('#composer-text').value = '';
  S.replyTo = null;
  S.editing = null;
  renderContext();
}

async function send() {
  const box = $('#composer-text');
  const text = box.value;
  const c = S.current;
  if (!text.trim() || !c) return;
  askNotifications();
  box.value = '';
  autoGrow(box);
  try {
    if (S.editing) {
      await call('edit', { message: S.editing.id, text });
    } else if (c.kind === 'secret') {
      await call('secret_send', { chat: c.id, texts: [text], file: null, reply_to: S.replyTo?.id || null });
    } else {
      await call('send', { to: c.query, texts: [text], reply_to: S.replyTo?.id || null });
    }
    S.replyTo = null;
    S.editing = null;
    renderContext();
    await loadMessages();
  } catch (e) {
    box.value = text;
    failed(e);
  }
}

function sendTyping() {
  const c = S.current;
  if (!c || c.kind !== 'private' || Date.now() - S.lastTypingSent < 4000) return;
  S.lastTypingSent = Date.now();
  call('typing', { to: c.query }).catch(() => {});
}

async function remove(m) {
  if (!confirm('Delete this message for everyone?')) return;
  try {
    await call('delete', { message: m.id });
    await loadMessages();
  } catch (e) {
    failed(e);
  }
}

async function press(m, button) {
  try {
    const { pressed } = await call('press', { message: m.id, button });
    if (pressed.kind === 'callback' && pressed.answer?.text) {
      if (pressed.answer.alert) alert(pressed.answer.text); else toast(pressed.answer.text);
    } else if (pressed.kind === 'url') {
      // Only web links: a bot's javascript: or file: link is not opened.
      if (/^https?:\/\//i.test(pressed.url)) window.open(pressed.url, '_blank', 'noopener');
      else toast(`Not opened: ${pressed.url}`);
    } else if (pressed.kind === 'sent' && keyboardOwner?.one_time) {
      S.keyboardUsed = keyboardOwner.id;
    }
    reloadMessagesSoon();
  } catch (e) {
    failed(e);
  }
}

/** The largest file the network takes (15,000 parts of 1 MiB), as the app checks it too. */
const MAX_FILE_BYTES = 15000 * 1024 * 1024;

/** Sends a file: the browser hands it to the app (first half of the bar), the node uploads it. */
function upload(file) {
  const c = S.current;
  if (!c) return;
  if (file.size > MAX_FILE_BYTES) {
    toast(`${file.name} is too big to send: at most ${sizeOf(MAX_FILE_BYTES)}.`);
    return;
  }
  const params = new URLSearchParams({ name: file.name });
  if (c.kind === 'secret') params.set('secret', c.id); else params.set('to', c.kind === 'private' ? String(c.chat) : c.id);
  const caption = $('#composer-text').value.trim();
  if (caption) { params.set('caption', caption); $('#composer-text').value = ''; }
  showProgress(0, `Sending ${file.name}…`);
  const xhr = new XMLHttpRequest();
  xhr.open('POST', `/api/upload?${params}`);
  xhr.upload.onprogress = (event) => { if (event.lengthComputable) showProgress(50 * event.loaded / event.total, `Sending ${file.name}…`); };
  xhr.onload = () => {
    hideProgress();
    let body = {};
    try { body = JSON.parse(xhr.responseText); } catch { body = { error: { message: `HTTP ${xhr.status}` } }; }
    if (body.error) failed(new ApiError(body.error, xhr.status)); else loadMessages();
  };
  xhr.onerror = () => { hideProgress(); failed(new Error(`${file.name} could not be sent: the app did not answer`)); };
  xhr.send(file);
}

function showProgress(percent, text) {
  const row = $('#progress-row');
  if (!row) return;
  row.hidden = false;
  $('#progress').value = percent;
  $('#progress-text').textContent = text;
}

function hideProgress() {
  const row = $('#progress-row');
  if (row) row.hidden = true;
}

// --- secret chats -------------------------------------------------------------------------------

async function startSecret(c) {
  try {
    const { chat } = await call('secret_start', { to: c.query, device: null });
    await loadChats();
    openChat({ kind: 'secret', chat: chat.peer, id: chat.id, secret: chat, title: nameOf(chat.peer), query: { UserId: chat.peer } });
  } catch (e) {
    failed(e);
  }
}

async function secretAct(name, c) {
  if (name === 'secret_close' && !confirm('Close this secret chat? Its messages are wiped on both devices.')) return;
  try {
    const { chat } = await call(name, { chat: c.id });
    c.secret = chat;
    await loadChats();
    renderPaneHeader();
    renderMessages();
  } catch (e) {
    failed(e);
  }
}

async function setTtl(c, value) {
  try {
    const { chat } = await call('secret_ttl', { chat: c.id, secs: value === 'off' ? null : Number(value) });
    c.secret = chat;
    renderPaneHeader();
  } catch (e) {
    failed(e);
  }
}

function fingerprintDialog(c) {
  const fp = c.secret.fingerprint;
  dialog('Encryption key', [
    h('p', {}, `Compare these with ${nameOf(c.secret.peer)}'s screen. If they match, nobody is in between.`),
    h('p', { class: 'emoji', 'aria-label': 'Key as emoji', id: 'fingerprint-emoji' }, fp ? fp.emoji : '—'),
    h('p', { class: 'hex', 'aria-label': 'Key as hex', id: 'fingerprint-hex' }, fp ? fp.hex : '—'),
  ]);
}

// --- dialogs ------------------------------------------------------------------------------------

/** A modal dialog (Esc closes it); `onsubmit` runs for its form, closing it unless it throws. */
function dialog(title, body, onsubmit, submitLabel = 'OK') {
  const error = h('p', { class: 'error', role: 'alert' });
  const form = h('form', {
    method: 'dialog',
    onsubmit: async (event) => {
      if (!onsubmit) return;
      event.preventDefault();
      error.textContent = '';
      try {
        await onsubmit();
        el.close();
      } catch (e) {
        error.textContent = e.message;
      }
    },
  }, h('h2', {}, title), ...body, error,
  h('div', { class: 'buttons' },
    onsubmit ? h('button', { type: 'submit', class: 'primary' }, submitLabel) : null,
    h('button', { type: 'button', onclick: () => el.close() }, onsubmit ? 'Cancel' : 'Close')));
  const el = h('dialog', { 'aria-label': title }, form);
  el.addEventListener('close', () => el.remove());
  document.body.append(el);
  el.showModal();
  return el;
}

const field = (label, input) => h('div', { class: 'field' }, h('label', { for: input.id }, label), input);

function newChatDialog() {
  const who = h('input', { id: 'new-chat-who', required: true, placeholder: '@username or +15550000002' });
  dialog('New chat', [field('Username or phone', who)], async () => {
    const { card } = await call('lookup', { query: queryOf(who.value) });
    S.names.set(card.user_id, card.username ? `${card.name} (@${card.username})` : card.name);
    const existing = S.chats.find((c) => c.kind !== 'group' && c.chat === card.user_id);
    openChat({ kind: 'private', chat: card.user_id, id: String(card.user_id), title: existing?.name || nameOf(card.user_id), query: { UserId: card.user_id } });
  }, 'Open chat');
}

function newGroupDialog() {
  const title = h('input', { id: 'group-title', required: true });
  const members = h('input', { id: 'group-members', placeholder: '@bob, +15550000003' });
  dialog('New group', [field('Group name', title), field('Members', members)], async () => {
    const list = members.value.split(/[\s,]+/).filter(Boolean).map(queryOf);
    const { group } = await call('group_create', { title: title.value, members: list });
    S.groups.set(group.id, group);
    await loadChats();
    openGroup(group);
  }, 'Create group');
}

function newChannelDialog() {
  const title = h('input', { id: 'channel-title', required: true });
  const isPublic = h('input', { id: 'channel-public', type: 'checkbox', checked: true });
  dialog('New channel', [field('Channel name', title), h('div', { class: 'field inline' }, isPublic, h('label', { for: 'channel-public' }, 'Public: anyone with the link reads it'))], async () => {
    const { group } = await call('channel_create', { title: title.value, public: isPublic.checked });
    S.groups.set(group.id, group);
    await loadChats();
    openGroup(group);
  }, 'Create channel');
}

function openGroup(group) {
  const entry = S.chats.find((c) => c.id === group.id);
  // A public channel read for the first time has no title until its state comes in.
  const title = group.title || entry?.name || (group.kind === 'channel' ? 'Channel' : 'Group');
  openChat({ kind: group.kind === 'channel' ? 'channel' : 'group', chat: entry?.chat, id: group.id, title, query: { Group: group.id } });
}

function joinDialog() {
  const link = h('input', { id: 'join-link', required: true });
  dialog('Join with a link', [field('Invite link, channel link or @name', link)], async () => {
    try {
      const joined = await call('join', { link: link.value.trim() });
      toast(`Asked to join; you are in once an admin's device lets you in (group ${joined.group}).`);
    } catch (e) {
      if (e.code !== 'USAGE') throw e;
      const { group } = await call('channel_subscribe', { link: link.value.trim(), announce: true });
      S.groups.set(group.id, group);
      await loadChats();
      openGroup(group);
    }
  }, 'Join');
}

async function groupDialog(id) {
  let group;
  try {
    ({ group } = await call('group_info', { group: id }));
  } catch (e) {
    failed(e);
    return;
  }
  S.groups.set(group.id, group);
  const linkOut = h('output', { id: 'invite-link', 'aria-label': 'Invite link' }, group.links[0] || '');
  const add = h('input', { id: 'group-add', placeholder: '@carol' });
  const body = [
    h('p', { class: 'muted' }, group.description || (group.kind === 'channel' ? `${group.subscribers} subscribers` : '')),
    h('h3', {}, group.kind === 'channel' ? 'Admins' : 'Members'),
    h('ul', { role: 'list', 'aria-label': 'Members' }, ...group.members.map((m) => h('li', {}, `${m.name}${m.admin ? ' (admin)' : ''}`))),
  ];
  if (group.admin && group.kind === 'channel' && group.public) {
    const name = h('input', { id: 'channel-name', placeholder: '@news' });
    body.push(field('Public name', name), h('p', {}, h('button', { type: 'button', onclick: async () => {
      try {
        await call('channel_name', { channel: group.id, name: name.value });
        toast(`Anyone now reads ${group.title} as @${name.value.replace(/^@/, '')}.`);
      } catch (e) { failed(e); }
    } }, 'Set name')));
  }
  const isGroup = group.kind === 'group';
  if (group.admin && isGroup) body.push(field('Add member', add));
  // A public channel's link is for anyone to read (any reader has it); others' are invites.
  if (group.admin || (group.kind === 'channel' && group.public)) {
    body.push(h('p', {}, h('button', { type: 'button', onclick: async () => {
      try {
        const { link } = await call(isGroup ? 'group_link' : 'channel_link', isGroup ? { group: group.id } : { channel: group.id });
        linkOut.textContent = link;
        navigator.clipboard?.writeText(link).catch(() => {});
      } catch (e) { failed(e); }
    } }, isGroup || !group.public ? 'Make invite link' : 'Channel link')), linkOut);
  }
  body.push(h('p', {}, h('button', { type: 'button', class: 'danger', onclick: async () => {
    if (!confirm(`Leave ${group.title}?`)) return;
    try { await call('group_leave', { group: group.id }); await loadChats(); } catch (e) { failed(e); }
  } }, group.kind === 'channel' ? 'Leave channel' : 'Leave group')));
  dialog(group.title, body, group.admin && isGroup ? async () => {
    if (!add.value.trim()) return;
    await call('group_change', { group: group.id, change: { change: 'add', users: add.value.split(/[\s,]+/).filter(Boolean).map(queryOf) } });
    reloadMessagesSoon();
  } : null, 'Add');
}

async function settingsDialog() {
  let me;
  let sessions;
  try {
    [me, { sessions }] = await Promise.all([call('whoami'), call('sessions')]);
  } catch (e) {
    failed(e);
    return;
  }
  S.me = me;
  const name = h('input', { id: 'profile-name', value: me.account.name });
  const username = h('input', { id: 'profile-username', value: me.account.username || '' });
  const current = h('input', { id: 'password-current', type: 'password', autocomplete: 'current-password' });
  const fresh = h('input', { id: 'password-new', type: 'password', autocomplete: 'new-password' });
  const sessionList = h('ul', { role: 'list', 'aria-label': 'Sessions' }, ...sessions.map((s) => h('li', {},
    `${s.device_name}${s.current ? ' (this device)' : ''} · since ${new Date(s.created_at * 1000).toLocaleDateString()}`,
    s.current ? null : h('button', { type: 'button', 'aria-label': `Revoke ${s.device_name}`, onclick: async (event) => {
      try { await call('revoke_sessions', { session_id: rawNumber(s.session_id) }); event.target.closest('li').remove(); } catch (e) { failed(e); }
    } }, 'Revoke'))));
  dialog('Settings', [
    h('p', {}, `${me.account.phone || ''} · user ${me.account.user_id}`),
    field('Name', name), field('Username', username),
    h('h3', {}, 'Two-step verification'),
    me.account.has_password ? field('Current password', current) : null,
    field(me.account.has_password ? 'New password (empty removes it)' : 'New password', fresh),
    h('h3', {}, 'Sessions'), sessionList,
  ], async () => {
    const changed = {};
    if (name.value !== me.account.name) changed.name = name.value;
    if (username.value.replace(/^@/, '') !== (me.account.username || '')) changed.username = username.value.replace(/^@/, '');
    if (Object.keys(changed).length) await call('set_profile', { username: changed.username ?? null, name: changed.name ?? null });
    if (fresh.value || (me.account.has_password && current.value)) {
      await call('set_password', { current: current.value || null, new: fresh.value || null });
    }
  }, 'Save');
}

/** Another device of the account signed in and asks for the history: send it, or not. */
function deviceRequestDialog(device, name) {
  dialog('A new device asks for your history', [
    h('p', {}, `“${name}” signed in to your account and asks for your chats. Send them only if this device is yours.`),
    h('p', { class: 'hex' }, device),
  ], async () => {
    const sent = await call('approve_device', { device });
    toast(`History sent to ${name} (${sent.messages ?? 'all'} messages).`);
  }, 'Send history');
}

// --- notifications ------------------------------------------------------------------------------

function askNotifications() {
  if ('Notification' in window && Notification.permission === 'default') Notification.requestPermission().catch(() => {});
}

function notify(message) {
  if (!document.hidden || !('Notification' in window) || Notification.permission !== 'granted') return;
  const n = new Notification(nameOf(message.from), { body: preview(message), tag: String(message.chat) });
  n.onclick = () => { window.focus(); n.close(); };
}

// --- events -------------------------------------------------------------------------------------

let socketRetry = 500;
function connectEvents() {
  const socket = new WebSocket(`ws://${location.host}/api/events`);
  socket.onopen = () => { socketRetry = 500; };
  socket.onmessage = (frame) => {
    let event;
    try { event = JSON.parse(frame.data, exactIds); } catch { return; }
    onEvent(event);
  };
  socket.onclose = async () => {
    banner('The app is not answering: reconnecting…');
    // An app started again has a new session: this page's cookie opens nothing any more.
    const gone = await request('/api/state').then(() => false, (e) => e.status === 401);
    if (gone) {
      banner('');
      $('#root').replaceChildren(h('p', { class: 'center error', role: 'alert' },
        'The app was restarted: open it again with the address `meshgram app` prints.'));
      return;
    }
    setTimeout(connectEvents, socketRetry);
    socketRetry = Math.min(socketRetry * 2, 10000);
  };
}

function inCurrentChat(chat) {
  const c = S.current;
  return c && c.kind !== 'secret' && c.chat === chat;
}

function onEvent(event) {
  switch (event.event) {
    case 'hello':
      banner(S.connected ? '' : OFFLINE);
      loadChats().catch(failed);
      if (S.current) reloadMessagesSoon();
      break;
    case 'message':
      learnNames(event.names);
      if (inCurrentChat(event.message.chat)) reloadMessagesSoon();
      if (event.received && !event.message.outgoing && !event.message.notice) notify(event.message);
      reloadChatsSoon();
      break;
    case 'typing':
      S.typing.set(event.user, Date.now() + 5000);
      renderPaneHeader();
      setTimeout(renderPaneHeader, 5100);
      break;
    case 'connection':
      S.connected = event.connected;
      banner(event.connected ? '' : OFFLINE, event.detail);
      break;
    case 'transfer': {
      const p = event.progress;
      if (p.direction === 'upload' || p.direction === 'Upload') {
        const percent = p.total_bytes ? 50 + 50 * p.done_bytes / p.total_bytes : 100;
        showProgress(percent, `Uploading ${p.name}: ${sizeOf(p.done_bytes)} of ${sizeOf(p.total_bytes)}`);
      }
      break;
    }
    case 'secret_message':
      if (S.current?.kind === 'secret' && S.current.id === event.message.chat) reloadMessagesSoon();
      if (!event.message.outgoing) notify({ from: event.message.peer, chat: event.message.chat, text: 'New secret message' });
      break;
    case 'secret_chat':
      if (S.current?.kind === 'secret' && S.current.id === event.chat.id) { S.current.secret = event.chat; renderPaneHeader(); }
      reloadChatsSoon();
      break;
    case 'group':
      S.groups.set(event.group.id, event.group);
      if (S.current?.id === event.group.id && event.group.title) {
        S.current.title = event.group.title;
        renderPaneHeader();
      }
      reloadChatsSoon();
      break;
    case 'press_answer':
      if (event.press.answer?.text) toast(event.press.answer.text);
      break;
    case 'device_request':
      deviceRequestDialog(event.device, event.device_name);
      break;
    case 'history_imported':
      toast('Your history from another device is here.');
      loadChats().catch(failed);
      break;
    case 'lagged':
      loadChats().catch(failed);
      if (S.current) reloadMessagesSoon();
      break;
    default:
      break;
  }
}

// A tab shown again reads what came while it was hidden (and sends the read receipts).
document.addEventListener('visibilitychange', () => { if (!document.hidden && S.current) reloadMessagesSoon(); });

// --- keyboard -----------------------------------------------------------------------------------

document.addEventListener('keydown', (event) => {
  if ((event.ctrlKey || event.metaKey) && event.key.toLowerCase() === 'k') {
    event.preventDefault();
    $('#search')?.focus();
  } else if (event.key === 'Escape' && !document.querySelector('dialog[open]')) {
    if (S.replyTo || S.editing) cancelReplyEdit();
    else if (document.activeElement === $('#search')) { $('#search').value = ''; S.search = ''; renderChatList(); }
  }
});

// --- start --------------------------------------------------------------------------------------

async function start() {
  const state = await request('/api/state');
  if (!state.signed_in) {
    renderSignIn(state);
    return;
  }
  S.me = await call('whoami').catch(() => ({ account: { user_id: state.user_id, name: 'You' } }));
  renderMain();
  await loadChats().catch(failed);
  connectEvents();
}

async function boot() {
  // The token comes in the address's fragment (never sent to a server, never in logs); trade it
  // for the app's cookie and take it out of the address bar.
  const fragment = new URLSearchParams(location.hash.slice(1));
  const token = fragment.get('token');
  const launch = fragment.get('launch');
  if (token || launch) {
    try {
      await post('/api/auth', token ? { token } : { launch });
    } catch (e) {
      $('#root').replaceChildren(h('p', { class: 'center error', role: 'alert' }, `This address's token is wrong: ${e.message}`));
      return;
    }
    history.replaceState(null, '', location.pathname);
  }
  try {
    await start();
  } catch (e) {
    const text = e.status === 401 ? 'Open the app with the address `meshgram app` printed: it carries the key to this app.' : e.message;
    $('#root').replaceChildren(h('p', { class: 'center error', role: 'alert' }, text));
    $('#root').setAttribute('aria-busy', 'false');
  }
}

boot();
