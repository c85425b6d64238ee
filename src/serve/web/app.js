// The chat page of `asagi-gguf serve`: a client of the server's own API, like any other.
//
// - Images are uploaded as soon as they are attached (POST v1/images), so the server encodes them while the
//   question is typed; messages then name them by id. An id the server has since given up is uploaded again.
// - Each question sends the whole conversation (as OpenAI clients do); the server's prefix cache finds what it
//   already computed, and the line under each answer shows it: tokens prefilled and tokens taken from the cache.
// - Answers stream as server-sent events; Stop aborts the request, and the server cancels it when the
//   connection closes.
// - Every URL is relative to the page, so the page works behind a reverse proxy that serves it under a path.
// - Model output is only ever set as text (textContent), never parsed as HTML.
'use strict';

const $ = (id) => document.getElementById(id);
const url = (path) => new URL(path, document.baseURI);

// Web storage may be off (privacy settings): the page then works without remembering anything.
function stored(area, key) {
  try {
    return window[area].getItem(key);
  } catch {
    return null;
  }
}

function store(area, key, value) {
  try {
    if (value === null) window[area].removeItem(key);
    else window[area].setItem(key, value);
  } catch {
    // not remembered
  }
}

// ---- Settings -------------------------------------------------------------------------------------------------

// The model card's decoding: HF beam sampling (do_sample, 5 beams, temperature 0.7, repetition penalty 1.5,
// HF's default top-k 50 and top-p 1), 256 new tokens.
const DEFAULTS = { mode: 'card', temperature: 0.7, beams: 5, repetition: 1.5, maxTokens: 256, minTokens: 0 };
const FIELDS = { temperature: 'temperature', beams: 'beams', repetition: 'repetition', maxTokens: 'max-tokens',
                 minTokens: 'min-tokens' };

function loadSettings() {
  try {
    return { ...DEFAULTS, ...JSON.parse(stored('localStorage', 'asagi.settings') || '{}') };
  } catch {
    return { ...DEFAULTS };
  }
}

let settings = loadSettings();

function showSettings() {
  $('mode').value = settings.mode;
  for (const [k, id] of Object.entries(FIELDS)) $(id).value = settings[k];
  // What each mode uses; the card's values are fixed.
  const mode = settings.mode;
  $('temperature').disabled = mode !== 'sample';
  $('beams').disabled = mode !== 'beam';
  $('repetition').disabled = mode === 'card';
  if (mode === 'card') {
    $('temperature').value = DEFAULTS.temperature;
    $('beams').value = DEFAULTS.beams;
    $('repetition').value = DEFAULTS.repetition;
  }
}

function readSettings() {
  const next = { ...settings, mode: $('mode').value };
  for (const [k, id] of Object.entries(FIELDS)) {
    // A disabled field shows what the mode fixes (the card's values), not the user's.
    const v = Number($(id).value);
    if (!$(id).disabled && $(id).value !== '' && Number.isFinite(v)) next[k] = v;
  }
  settings = next;
  store('localStorage', 'asagi.settings', JSON.stringify(settings));
  showSettings();
}

// The request fields of the chosen decoding (the server checks them and answers 400 with the reason).
function decoding(s) {
  const d = { max_tokens: Math.round(s.maxTokens), repetition_penalty: s.repetition };
  if (s.minTokens > 0) d.min_tokens = Math.round(s.minTokens);
  switch (s.mode) {
    case 'greedy': return { ...d, num_beams: 1, temperature: 0 };
    case 'beam': return { ...d, num_beams: Math.round(s.beams), temperature: 0 };
    case 'sample': return { ...d, num_beams: 1, temperature: s.temperature, top_k: 50, top_p: 1 };
    default: return { ...d, num_beams: DEFAULTS.beams, temperature: DEFAULTS.temperature,
                      repetition_penalty: DEFAULTS.repetition, top_k: 50, top_p: 1 };
  }
}

// ---- The API, with the key ------------------------------------------------------------------------------------

let apiKey = stored('sessionStorage', 'asagi.key') || '';
let keyAsked = null;

// Asks for the API key once, however many requests were refused at the same time; null if cancelled.
function askKey(wrong) {
  if (!keyAsked) {
    keyAsked = new Promise((resolve) => {
      const dialog = $('key-dialog');
      $('key-retry').textContent = wrong ? '（キーが違います）' : '';
      $('key').value = '';
      const done = (value) => {
        $('key-ok').onclick = $('key-cancel').onclick = $('key').onkeydown = dialog.onclose = null;
        if (dialog.open) dialog.close();
        keyAsked = null;
        resolve(value);
      };
      // A key is sent in a header: printable ASCII only (a pasted full-width space or newline would make every
      // request fail before it is sent).
      const ok = () => {
        const key = $('key').value.trim();
        if (/^[\x21-\x7e]+$/.test(key)) done(key);
        else $('key-retry').textContent = '（キーは半角英数字と記号です）';
      };
      $('key-ok').onclick = ok;
      $('key-cancel').onclick = () => done(null);
      dialog.onclose = () => done(null); // Esc, or closed any other way
      $('key').onkeydown = (e) => {
        if (e.key === 'Enter' && !e.isComposing && e.keyCode !== 229) ok();
      };
      dialog.showModal();
    });
  }
  return keyAsked;
}

// fetch with the key; the server's 401 (`WWW-Authenticate: Bearer`) asks for the key and tries again, until
// cancelled. A request that went out with an older key just tries again with the new one.
async function call(path, init = {}) {
  for (;;) {
    const used = apiKey;
    const headers = { ...(init.headers || {}) };
    if (used) headers.Authorization = 'Bearer ' + used;
    const r = await fetch(url(path), { ...init, headers });
    if (r.status !== 401 || !/^Bearer/i.test(r.headers.get('WWW-Authenticate') || '')) return r;
    if (apiKey !== used) continue;
    const key = await askKey(used !== '');
    if (key === null) return r;
    apiKey = key;
    store('sessionStorage', 'asagi.key', key);
  }
}

function postJson(path, body, signal) {
  return call(path, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body),
                      signal });
}

class ApiError extends Error {}

// What to tell the user of a failure: the API's own message, or that the server could not be reached.
const describe = (e) => (e instanceof ApiError ? e.message : `サーバーに接続できません: ${e.message}`);

// The server's error message for a failed response, with what the status means for the user.
async function apiError(r) {
  let msg = '';
  try {
    const j = await r.json();
    msg = (j && j.error && j.error.message) || '';
  } catch {
    msg = '';
  }
  const what = { 400: 'リクエストが受け付けられませんでした', 401: 'API キーが必要です', 408: '時間切れです',
                 413: '大きすぎます', 503: 'サーバーが混雑しています。しばらくしてから再度お試しください' }[r.status]
    || 'サーバーエラー';
  return new ApiError(`${what}（${r.status}）${msg ? ': ' + msg : ''}`);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function retryAfter(r) {
  const s = Number(r.headers.get('Retry-After'));
  return (Number.isFinite(s) && s > 0 ? Math.min(s, 30) : 1) * 1000;
}

// The data lines of a server-sent event stream, one string per event.
async function* events(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value.replace(/\r\n?/g, '\n');
    let end;
    while ((end = buf.indexOf('\n\n')) >= 0) {
      const block = buf.slice(0, end);
      buf = buf.slice(end + 2);
      const data = block.split('\n').filter((l) => l.startsWith('data:')).map((l) => l.slice(5).replace(/^ /, ''));
      if (data.length) yield data.join('\n');
    }
  }
}

// ---- Images ---------------------------------------------------------------------------------------------------

let vision = true;
let pending = []; // images attached to the next question

function readDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`${file.name} を読み込めません`));
    reader.readAsDataURL(file);
  });
}

const BUSY_TRIES = 10;

// Uploads (again) an attached image: the server decodes and encodes it and answers its id. `att.ready` is the
// latest upload's promise.
function upload(att) {
  att.ready = (async () => {
    att.state = 'encoding';
    att.error = '';
    att.busy = 0;
    renderAttachments();
    try {
      att.dataUrl = att.dataUrl || await readDataUrl(att.file);
      for (;;) {
        const r = await postJson('v1/images', { url: att.dataUrl });
        if (r.ok) {
          const j = await r.json();
          Object.assign(att, { id: j.id, encodeMs: j.encode_ms, cached: j.cached, state: 'ready' });
          return;
        }
        if (r.status !== 503 || ++att.busy > BUSY_TRIES) throw await apiError(r);
        // The server's upload queue is full: said on the thumbnail, tried again after Retry-After.
        renderAttachments();
        await sleep(retryAfter(r));
      }
    } catch (e) {
      att.state = 'error';
      att.error = describe(e);
      throw e;
    } finally {
      renderAttachments();
    }
  })();
  att.ready.catch(() => {});
  return att.ready;
}

function attach(files) {
  for (const file of files) {
    if (!file.type.startsWith('image/')) {
      notice(`画像ではありません: ${file.name || '(名前なし)'}（${file.type || '種類不明'}）`);
      continue;
    }
    if (!vision) {
      notice('このサーバーは画像を扱えません（--mmproj なしで起動されています）');
      return;
    }
    const att = { file, name: file.name || '貼り付けた画像', thumb: URL.createObjectURL(file), state: 'new' };
    upload(att);
    pending.push(att);
  }
  renderAttachments();
}

function renderAttachments() {
  const box = $('attachments');
  box.replaceChildren(...pending.map((att) => {
    const el = document.createElement('figure');
    el.className = 'thumb';
    el.dataset.state = att.state;
    el.title = att.name;
    const img = document.createElement('img');
    img.src = att.thumb;
    img.alt = att.name;
    const status = document.createElement('figcaption');
    status.className = 'status';
    status.textContent = att.state === 'ready'
      ? (att.cached ? 'キャッシュ済み' : `エンコード ${Math.round(att.encodeMs)} ms`)
      : att.state === 'error' ? att.error
      : att.busy ? `サーバーが混雑しています。再試行 ${att.busy}/${BUSY_TRIES}` : 'エンコード中…';
    const remove = document.createElement('button');
    remove.type = 'button';
    remove.className = 'remove';
    remove.textContent = '×';
    remove.title = '外す';
    remove.setAttribute('aria-label', `${att.name} を外す`);
    remove.onclick = () => {
      pending = pending.filter((a) => a !== att);
      URL.revokeObjectURL(att.thumb);
      renderAttachments();
      $('input').focus();
    };
    el.append(img, status, remove);
    return el;
  }));
}

// ---- The conversation -----------------------------------------------------------------------------------------

const conversation = []; // {role: 'user', text, images: [att]} | {role: 'assistant', text}
let running = null; // the AbortController of the question being sent and answered
let epoch = 0; // counts new conversations: an answer ending after "new conversation" leaves the new one alone

function notice(text) {
  const n = $('notice');
  n.textContent = text;
  n.hidden = !text;
}

function atBottom() {
  return window.innerHeight + window.scrollY >= document.body.scrollHeight - 80;
}

function bubble(role) {
  $('empty').hidden = true;
  const el = document.createElement('article');
  el.className = `msg ${role}`;
  const text = document.createElement('div');
  text.className = 'text';
  el.append(text);
  $('log').append(el);
  return el;
}

function showUser(m) {
  const el = bubble('user');
  if (m.images.length) {
    const images = document.createElement('div');
    images.className = 'images';
    for (const att of m.images) {
      const img = document.createElement('img');
      img.src = att.thumb;
      img.alt = att.name;
      images.append(img);
    }
    el.prepend(images);
  }
  el.querySelector('.text').textContent = m.text;
  window.scrollTo(0, document.body.scrollHeight);
  return el;
}

function toApi(m) {
  if (m.role === 'assistant') return { role: 'assistant', content: m.text };
  const parts = m.images.map((att) => ({ type: 'image_url', image_url: { url: att.id } }));
  if (m.text) parts.push({ type: 'text', text: m.text });
  return { role: 'user', content: parts };
}

function setBusy(busy) {
  $('send').disabled = busy;
  $('stop').hidden = !busy;
  $('log').setAttribute('aria-busy', String(busy));
}

// Resolves when the signal aborts.
const aborted = (signal) => new Promise((resolve) => signal.addEventListener('abort', resolve, { once: true }));

async function send() {
  if (running) return;
  const text = $('input').value.trim();
  if (!text && !pending.length) return;
  running = new AbortController();
  const stop = aborted(running.signal);
  setBusy(true);
  notice('');
  // Wait for the attached images' uploads (images attached or taken off meanwhile included), or for Stop.
  let images;
  do {
    images = pending.slice();
    await Promise.race([Promise.allSettled(images.map((att) => att.ready)), stop]);
  } while (!running.signal.aborted && (images.length !== pending.length || images.some((a, i) => a !== pending[i])));
  const failed = images.filter((att) => att.state !== 'ready');
  // The question as it reads now (it could be edited while the images were uploading).
  const question = $('input').value.trim();
  if (running.signal.aborted || failed.length || (!question && !images.length)) {
    // Nothing was sent: the question and its images stay where they are.
    if (failed.length && !running.signal.aborted) {
      notice(`送れない画像があります（${failed.map((a) => a.name).join('、')}）。外してから送信してください。`);
    }
    running = null;
    setBusy(false);
    return;
  }
  pending = [];
  renderAttachments();
  $('input').value = '';
  const m = { role: 'user', text: question, images };
  conversation.push(m);
  m.el = showUser(m);
  await answer(m);
}

// Generates the answer to the last question, streaming it into a new bubble.
async function answer(question) {
  const chat = epoch;
  const signal = running.signal;
  const el = bubble('assistant');
  el.classList.add('streaming');
  const out = el.querySelector('.text');
  const started = performance.now();
  let text = '', firstAt = 0, updates = 0, done = null, finish = '', complete = false, reuploaded = false;
  let following = true; // the reader is at the end of the conversation (showUser scrolled there)
  try {
    for (;;) {
      const body = { messages: conversation.map(toApi), stream: true, stream_options: { include_usage: true },
                     user: userId(), ...decoding(settings) };
      const r = await postJson('v1/chat/completions', body, signal);
      if (r.ok) {
        for await (const data of events(r.body)) {
          // Events already received when Stop was pressed are not shown.
          if (signal.aborted) throw new DOMException('stopped', 'AbortError');
          if (data === '[DONE]') {
            complete = true;
            break;
          }
          const chunk = JSON.parse(data);
          if (chunk.error) throw new ApiError(`生成中にエラーが発生しました: ${chunk.error.message}`);
          const choice = chunk.choices && chunk.choices[0];
          const delta = choice && choice.delta && choice.delta.content;
          if (delta) {
            following = atBottom();
            firstAt = firstAt || performance.now();
            text += delta;
            out.textContent = text;
            el.dataset.updates = String(++updates);
            if (following) window.scrollTo(0, document.body.scrollHeight);
          }
          if (choice && choice.finish_reason) finish = choice.finish_reason;
          if (chunk.usage) done = chunk;
        }
        // A stream cut before its end (the server stopped, a proxy gave up) is not an answer.
        if (!complete) throw new ApiError('回答が途中で途切れました（接続が切れました）');
        break;
      }
      const err = await apiError(r);
      // The server gave up an uploaded image (its cache is bounded): upload the conversation's images again.
      if (r.status === 400 && /image cache/.test(err.message) && !reuploaded) {
        reuploaded = true;
        const stopped = aborted(signal).then(() => { throw new DOMException('stopped', 'AbortError'); });
        stopped.catch(() => {}); // when the uploads win the race, a later Stop rejects it unobserved
        await Promise.race([Promise.all(conversation.flatMap((m) => m.images || []).map(upload)), stopped]);
        continue;
      }
      throw err;
    }
    conversation.push({ role: 'assistant', text });
    if (finish === 'length') note(el, '（最大トークン数に達しました）');
    showStats(el, question, done, firstAt ? firstAt - started : 0);
  } catch (e) {
    // Unless the conversation was cleared meanwhile: what was shown stays in the conversation (the next question
    // continues from it); a question with no answer at all goes back to the input.
    if (chat === epoch) {
      if (text) conversation.push({ role: 'assistant', text });
      else takeBack(question);
      if (e.name === 'AbortError') {
        note(el, '（停止しました）');
        el.dataset.stopped = 'true';
      } else {
        failed(el, e);
      }
    }
  } finally {
    el.classList.remove('streaming');
    el.dataset.done = 'true';
    // What was appended at the end (costs, a note, an error) stays in view if the reader was following.
    if (following) window.scrollTo(0, document.body.scrollHeight);
    running = null;
    setBusy(false);
  }
}

// A question that got no answer leaves the conversation and goes back to the input, to edit or send again.
function takeBack(question) {
  conversation.splice(conversation.indexOf(question), 1);
  question.el.classList.add('failed');
  if (!$('input').value) $('input').value = question.text;
  if (!pending.length) {
    pending = question.images;
    renderAttachments();
  }
}

function note(el, text) {
  const s = document.createElement('div');
  s.className = 'note';
  s.textContent = text;
  el.append(s);
}

function failed(el, e) {
  const d = document.createElement('div');
  d.className = 'error';
  d.textContent = describe(e);
  el.append(d);
  el.dataset.error = 'true';
}

// What this answer cost: image encoding (at upload and in the request), the prompt positions computed and those
// the prefix cache supplied, time to the first token, generation speed.
function showStats(el, question, chunk, ttftMs) {
  if (!chunk) return;
  const t = chunk.timings || {};
  const u = chunk.usage || {};
  const cached = (u.prompt_tokens_details && u.prompt_tokens_details.cached_tokens) || 0;
  const encodeMs = question.images.reduce((s, a) => s + (a.encodeMs || 0), 0) + (t.image_encode_ms || 0);
  const speed = t.predicted_ms > 0 ? (t.predicted_n / t.predicted_ms) * 1000 : 0;
  const parts = [];
  if (question.images.length) parts.push(`画像エンコード ${Math.round(encodeMs)} ms`);
  parts.push(`プリフィル ${t.prompt_n} トークン（キャッシュ ${cached}）`);
  parts.push(`最初のトークンまで ${(ttftMs / 1000).toFixed(2)} 秒`);
  parts.push(`${t.predicted_n} トークン、${speed.toFixed(1)} トークン/秒`);
  const s = document.createElement('div');
  s.className = 'stats';
  s.textContent = parts.join(' · ');
  Object.assign(s.dataset, { prefill: t.prompt_n, cached, tokens: t.predicted_n, encodeMs: encodeMs.toFixed(2) });
  el.append(s);
}

function userId() {
  // Cached-token counts are reported for the same `user` only: one id per browser tab.
  let id = stored('sessionStorage', 'asagi.user') || window.asagiUser;
  if (!id) {
    id = 'web-' + crypto.getRandomValues(new Uint32Array(4)).join('-');
    window.asagiUser = id;
    store('sessionStorage', 'asagi.user', id);
  }
  return id;
}

function newChat() {
  epoch++;
  if (running) running.abort();
  conversation.length = 0;
  $('log').replaceChildren($('empty'));
  $('empty').hidden = false;
  notice('');
  $('input').focus();
}

// ---- Wiring ---------------------------------------------------------------------------------------------------

async function loadModel() {
  try {
    const r = await call('v1/models');
    if (!r.ok) throw await apiError(r);
    const m = (await r.json()).data[0];
    $('model').textContent = m.id;
    document.title = `Asagi · ${m.id}`;
    vision = !(m.meta && m.meta.vision === false);
    $('attach').classList.toggle('off', !vision);
  } catch (e) {
    notice(describe(e));
  }
}

function hasFiles(e) {
  return e.dataTransfer && [...e.dataTransfer.types].includes('Files');
}

function wire() {
  showSettings();
  $('settings-toggle').onclick = () => {
    const open = $('settings').hidden;
    $('settings').hidden = !open;
    $('settings-toggle').setAttribute('aria-expanded', String(open));
  };
  $('settings').onchange = readSettings;
  $('reset-settings').onclick = () => {
    settings = { ...DEFAULTS };
    store('localStorage', 'asagi.settings', null);
    showSettings();
  };
  $('new-chat').onclick = newChat;
  $('composer').onsubmit = (e) => {
    e.preventDefault();
    send();
  };
  $('stop').onclick = () => running && running.abort();
  const input = $('input');
  input.addEventListener('keydown', (e) => {
    // Enter (or Esc) that confirms (or cancels) an IME conversion (kana -> kanji) is for the IME, not the page:
    // `isComposing` during a composition, keyCode 229 for the key that ends it (Safari fires compositionend first,
    // then this keydown).
    if (e.isComposing || e.keyCode === 229) return;
    if (e.key === 'Escape' && running) running.abort();
    if (e.key !== 'Enter' || e.shiftKey) return;
    e.preventDefault();
    send();
  });
  $('file').onchange = (e) => {
    attach([...e.target.files]);
    e.target.value = '';
  };
  document.addEventListener('paste', (e) => {
    const data = e.clipboardData;
    // Text copied from a spreadsheet or document often comes with a picture of itself: the text wins.
    const files = data && !data.types.includes('text/plain') ? [...data.files] : [];
    if (files.length) {
      e.preventDefault();
      attach(files);
    }
  });
  let depth = 0;
  document.addEventListener('dragenter', (e) => {
    if (!hasFiles(e)) return;
    depth++;
    $('drop').hidden = false;
  });
  document.addEventListener('dragleave', (e) => {
    if (!hasFiles(e)) return;
    depth = Math.max(0, depth - 1);
    $('drop').hidden = depth === 0;
  });
  document.addEventListener('dragover', (e) => {
    if (hasFiles(e)) e.preventDefault();
  });
  document.addEventListener('drop', (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    depth = 0;
    $('drop').hidden = true;
    attach([...e.dataTransfer.files]);
  });
  input.focus();
  loadModel();
}

wire();
