/*
 * OPSD dashboard: the tenant's jobs, and per job live charts of its metrics, its events,
 * checkpoints, evaluations and an adapter download. Plain browser JavaScript; charts by plotly.js (served by
 * this service from the plotly Python package). Talks to the JSON API with the tenant's key,
 * kept in localStorage; `#key=...` in the URL is taken once and removed from the address bar.
 * Everything shown comes from the API as text (textContent), never as HTML.
 */
'use strict';

(() => {
  const ROOT = document.documentElement.dataset.root || '';
  const KEY_STORE = 'opsd.apiKey';
  const LIST_POLL_MS = 5000;
  const JOB_POLL_MS = 2000;
  const MAX_POINTS = 1000;
  const TERMINAL = new Set(['succeeded', 'failed', 'cancelled']);
  const EVAL_TERMINAL = new Set(['succeeded', 'failed']);
  // One chart per entry; series that a job did not log are left out, empty charts hidden.
  const CHARTS = [
    { id: 'loss', title: 'Loss', series: ['loss'] },
    { id: 'divergence', title: 'Divergence (teacher vs student)', series: ['divergence'] },
    { id: 'entropy', title: 'Entropy (nats/token)', series: ['student_entropy', 'teacher_entropy'] },
    { id: 'lr', title: 'Learning rate', series: ['lr'], exponent: true },
    { id: 'grad_norm', title: 'Grad norm', series: ['grad_norm'] },
    { id: 'generated_tokens', title: 'Generated tokens per step', series: ['generated_tokens'] },
    { id: 'tokens_per_s', title: 'Tokens / s', series: ['tokens_per_s'] },
    { id: 'eval', title: 'Eval scores', prefix: 'eval/', unit: true },
  ];
  const CHARTED = new Set(CHARTS.flatMap((c) => c.series || []));
  const COLORS = ['#3b5bdb', '#e8590c', '#2b8a3e', '#ae3ec9', '#1098ad', '#f08c00', '#c92a2a'];

  // Job events drawn on every chart at their step (see appendEvents).
  const MARKER_COLORS = { alarm: '#c92a2a', best_checkpoint: '#2b8a3e', early_stopped: '#868e96' };

  const state = {
    key: null,
    selected: null,
    job: null,
    metrics: {},
    lastEventId: 0,
    markers: [],
    runFirstPreflight: null,
    checkpointsSeen: -1,
    statusFilter: '',
    nextCursor: null,
    extraJobs: [],
    compare: new Set(),
    compareMetrics: {},
    timers: {},
    generation: 0,
  };

  const $ = (selector) => document.querySelector(selector);

  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props)) {
      if (name === 'class') node.className = value;
      else if (name === 'text') node.textContent = value;
      else if (name.startsWith('on')) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value);
    }
    for (const child of children) node.append(child);
    return node;
  }

  // ------------------------------------------------------------------------------ the API key
  function hashParams() {
    return new URLSearchParams(location.hash.replace(/^#/, ''));
  }

  function writeHash(params) {
    const hash = params.toString();
    history.replaceState(null, '', location.pathname + location.search + (hash ? `#${hash}` : ''));
  }

  function takeKeyFromUrl() {
    const params = hashParams();
    const key = params.get('key');
    if (key) {
      localStorage.setItem(KEY_STORE, key.trim());
      params.delete('key');
      writeHash(params);
    }
  }

  function maskedKey(key) {
    return key.length > 14 ? `${key.slice(0, 10)}…${key.slice(-4)}` : 'key set';
  }

  // ---------------------------------------------------------------------------------- the API
  class ApiError extends Error {
    constructor(status, body) {
      const detail = (body && body.error) || {};
      super(detail.message || `HTTP ${status}`);
      this.status = status;
      this.code = detail.code || 'error';
    }
  }

  function apiUrl(path, params) {
    const url = new URL(ROOT + path, location.origin);
    for (const [name, value] of Object.entries(params || {})) {
      if (value === null || value === undefined || value === '') continue;
      if (Array.isArray(value)) value.forEach((v) => url.searchParams.append(name, v));
      else url.searchParams.set(name, value);
    }
    return url;
  }

  async function api(path, params) {
    const response = await fetch(apiUrl(path, params), {
      headers: { Authorization: `Bearer ${state.key}`, Accept: 'application/json' },
      cache: 'no-store',
    });
    if (!response.ok) {
      let body = null;
      try {
        body = await response.json();
      } catch (_) {
        body = null;
      }
      throw new ApiError(response.status, body);
    }
    return response.json();
  }

  const jobPath = (id, suffix = '') => `/jobs/${encodeURIComponent(id)}${suffix}`;

  // ------------------------------------------------------------------------------- formatting
  function fmtTime(iso) {
    if (!iso) return '–';
    return new Date(iso).toLocaleString(undefined, {
      month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit', second: '2-digit',
    });
  }

  function fmtAgo(iso) {
    if (!iso) return '';
    const seconds = Math.max(0, (Date.now() - new Date(iso).getTime()) / 1000);
    if (seconds < 60) return `${Math.round(seconds)}s ago`;
    if (seconds < 3600) return `${Math.round(seconds / 60)}m ago`;
    if (seconds < 86400) return `${Math.round(seconds / 3600)}h ago`;
    return `${Math.round(seconds / 86400)}d ago`;
  }

  function fmtDuration(seconds) {
    if (!isFinite(seconds) || seconds < 0) return '';
    const s = Math.round(seconds);
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, '0')}s`;
    return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, '0')}m`;
  }

  function stepsText(job) {
    const total = job.progress.total_steps;
    return total ? `${job.progress.step}/${total}` : `${job.progress.step}`;
  }

  function badge(status) {
    return el('span', { class: `badge s-${status}`, text: status });
  }

  function shortModel(name) {
    const text = String(name || '–');
    return text.length > 34 ? `…${text.slice(-33)}` : text;
  }

  // ------------------------------------------------------------------------ banner and views
  function banner(message) {
    const node = $('#banner');
    node.textContent = message || '';
    node.hidden = !message;
  }

  function showLogin(message) {
    stopTimers();
    state.key = null;
    $('#app').hidden = true;
    $('#sign-out').hidden = true;
    $('#key-badge').hidden = true;
    $('#live').hidden = true;
    $('#login').hidden = false;
    $('#key-error').textContent = message || '';
    $('#key-error').hidden = !message;
    $('#key-input').focus();
  }

  function showApp() {
    $('#login').hidden = true;
    $('#app').hidden = false;
    $('#sign-out').hidden = false;
    $('#key-badge').textContent = maskedKey(state.key);
    $('#key-badge').hidden = false;
  }

  function stopTimers() {
    for (const timer of Object.values(state.timers)) clearTimeout(timer);
    state.timers = {};
  }

  function schedule(name, fn, delay) {
    clearTimeout(state.timers[name]);
    state.timers[name] = setTimeout(fn, delay);
  }

  function handleError(error) {
    if (error instanceof ApiError && error.status === 401) {
      localStorage.removeItem(KEY_STORE);
      showLogin('The service rejected this API key. Enter a valid one.');
      return true;
    }
    if (error instanceof ApiError) {
      banner(`The service answered ${error.status} ${error.code}: ${error.message}`);
    } else {
      banner('The service is unreachable; retrying…');
    }
    return false;
  }

  // -------------------------------------------------------------------------------- jobs list
  async function refreshList() {
    if (!state.key) return;
    try {
      if (!document.hidden) {
        const [page, usage] = await Promise.all([
          api('/jobs', { limit: 50, status: state.statusFilter }),
          api('/usage'),
        ]);
        renderJobs(page.data, page.next_cursor);
        renderUsage(usage);
        banner('');
      }
    } catch (error) {
      if (handleError(error)) return;
    }
    schedule('list', refreshList, LIST_POLL_MS);
  }

  // The tenant's usage over the last 30 days (GET /usage), under the jobs list.
  function renderUsage(usage) {
    const t = usage.totals;
    const n = (v) => Number(v).toLocaleString();
    const rows = [
      ['device time', fmtDuration(t.device_seconds)],
      ['steps', n(t.steps)],
      ['generated tokens', n(t.generated_tokens)],
      ['scored (teacher)', n(t.teacher_scored_tokens)],
      ['scored (student)', n(t.student_scored_tokens)],
      ['eval tokens', n(t.eval_tokens)],
    ];
    $('#usage-totals').replaceChildren(
      ...rows.flatMap(([name, value]) => [el('dt', { text: name }), el('dd', { text: value })]),
    );
    $('#usage').hidden = false;
  }

  async function loadMore() {
    if (!state.nextCursor) return;
    try {
      const page = await api('/jobs', {
        limit: 50, status: state.statusFilter, cursor: state.nextCursor,
      });
      state.extraJobs = state.extraJobs.concat(page.data);
      state.nextCursor = page.next_cursor;
      $('#more').hidden = !state.nextCursor;
      appendJobs(page.data);
    } catch (error) {
      handleError(error);
    }
  }

  function jobItem(job) {
    const fraction = job.progress.total_steps ? job.progress.step / job.progress.total_steps : 0;
    const item = el(
      'li',
      {
        class: `job-item${job.id === state.selected ? ' selected' : ''}`,
        'data-id': job.id,
        'data-status': job.status,
        tabindex: '0',
        onclick: () => selectJob(job.id),
        onkeydown: (event) => { if (event.key === 'Enter') selectJob(job.id); },
      },
      el('div', { class: 'row' }, compareBox(job), el('code', { text: job.id }), badge(job.status)),
      el('div', {
        class: 'sub',
        text: `${job.spec.method || 'opsd'} · ${shortModel(job.spec.base_model)} · step ${stepsText(job)} · ${fmtAgo(job.created_at)}`,
      }),
    );
    if (!TERMINAL.has(job.status) || fraction) {
      const bar = el('div', { class: 'mini-progress' }, el('div'));
      bar.firstChild.style.width = `${Math.round(Math.min(1, fraction) * 100)}%`;
      item.append(bar);
    }
    return item;
  }

  function renderJobs(jobs, nextCursor) {
    const list = $('#jobs');
    list.replaceChildren(...jobs.map(jobItem));
    state.extraJobs = [];
    state.nextCursor = nextCursor;
    $('#more').hidden = !nextCursor;
    $('#jobs-empty').hidden = jobs.length > 0;
    if (!state.selected && jobs.length && !hashParams().get('job')) selectJob(jobs[0].id);
  }

  function updateJobItem(job) {
    const item = document.querySelector(`.job-item[data-id="${CSS.escape(job.id)}"]`);
    if (item && item.dataset.status !== job.status) item.replaceWith(jobItem(job));
  }

  function appendJobs(jobs) {
    $('#jobs').append(...jobs.map(jobItem));
  }

  // ------------------------------------------------------------------------ run comparison
  // Tick jobs in the list, then "Compare": one metric of every ticked job overlaid by step, and
  // held-out accuracy (eval/avg@n) against cumulative generated tokens (the paper's Figure 3).
  function compareBox(job) {
    const box = el('input', {
      type: 'checkbox',
      class: 'compare-box',
      'data-id': job.id,
      title: 'compare this job',
      'aria-label': `compare ${job.id}`,
      onclick: (event) => event.stopPropagation(),
      onchange: (event) => {
        if (event.target.checked) state.compare.add(job.id);
        else state.compare.delete(job.id);
        updateCompareButton();
      },
    });
    box.checked = state.compare.has(job.id);
    return box;
  }

  function updateCompareButton() {
    const button = $('#compare-open');
    button.hidden = state.compare.size < 2;
    button.textContent = `Compare ${state.compare.size} jobs`;
  }

  async function openCompare() {
    const ids = [...state.compare];
    try {
      const answers = await Promise.all(
        ids.map((id) => api(jobPath(id, '/metrics'), { max_points: MAX_POINTS })),
      );
      state.compareMetrics = {};
      ids.forEach((id, i) => { state.compareMetrics[id] = answers[i].metrics; });
    } catch (error) {
      handleError(error);
      return;
    }
    clearTimeout(state.timers.job);
    state.generation += 1;
    state.selected = null;
    $('#job').hidden = true;
    $('#no-job').hidden = true;
    $('#compare').hidden = false;
    $('#compare-jobs').textContent = ids.join(' · ');
    const names = [...new Set(ids.flatMap((id) => Object.keys(state.compareMetrics[id])))].sort();
    const select = $('#compare-metric');
    const current = select.value;
    select.replaceChildren(...names.map((n) => el('option', { value: n, text: n })));
    select.value = names.includes(current) ? current : (names.includes('loss') ? 'loss' : names[0] || '');
    renderCompare();
  }

  function closeCompare() {
    $('#compare').hidden = true;
    $('#no-job').hidden = false;
  }

  function accuracyName(metrics) {
    return Object.keys(metrics).find((n) => /^eval\/avg@\d+$/.test(n));
  }

  // (tokens, accuracy) points of one job: each eval step's accuracy at the cumulative generated
  // tokens of that step (0 before the first step: the base model).
  function accuracyByTokens(metrics) {
    const name = accuracyName(metrics);
    const tokens = metrics.generated_tokens_total;
    if (!name) return null;
    const x = [];
    const y = [];
    metrics[name].steps.forEach((step, i) => {
      let total = 0;
      if (step > 0 && tokens) {
        const at = tokens.steps.findIndex((s) => s >= step);
        total = tokens.values[at === -1 ? tokens.values.length - 1 : at];
      }
      x.push(total);
      y.push(metrics[name].values[i]);
    });
    return { name, x, y };
  }

  function renderCompare() {
    if (typeof Plotly === 'undefined') return;
    const ids = Object.keys(state.compareMetrics);
    const metric = $('#compare-metric').value;
    const traces = ids
      .filter((id) => state.compareMetrics[id][metric])
      .map((id, i) => ({ ...trace(id, state.compareMetrics[id][metric], i), name: id }));
    const layout = chartLayout(metric, null);
    layout.showlegend = true;
    layout.margin.t = 52;
    Plotly.react($('#chart-compare'), traces, layout, { displaylogo: false, responsive: true });

    const points = ids.map((id, i) => [id, i, accuracyByTokens(state.compareMetrics[id])])
      .filter(([, , p]) => p);
    $('#compare-tokens-empty').hidden = points.length > 0;
    $('#chart-compare-tokens').hidden = points.length === 0;
    const accuracy = points.map(([id, i, p]) => ({
      type: 'scatter',
      mode: 'lines+markers',
      name: `${id} (${p.name})`,
      x: p.x,
      y: p.y,
      line: { color: COLORS[i % COLORS.length], width: 2 },
      marker: { size: 6 },
      hovertemplate: `${id}<br>%{x:,} tokens: %{y:.3f}<extra></extra>`,
    }));
    const tokensLayout = chartLayout('Held-out accuracy vs generated tokens', { unit: true });
    tokensLayout.xaxis.title.text = 'generated tokens (cumulative)';
    tokensLayout.yaxis.range = [-0.03, 1.03];
    tokensLayout.showlegend = true;
    tokensLayout.margin.t = 52;
    if (points.length) {
      Plotly.react($('#chart-compare-tokens'), accuracy, tokensLayout, {
        displaylogo: false, responsive: true,
      });
    }
  }

  // ------------------------------------------------------------------------------- one job
  function selectJob(id) {
    if (state.selected === id && state.job) return;
    clearTimeout(state.timers.job);
    state.generation += 1;
    state.selected = id;
    state.job = null;
    state.metrics = {};
    state.lastEventId = 0;
    state.markers = [];
    state.runFirstPreflight = null;
    state.checkpointsSeen = -1;
    const params = hashParams();
    params.set('job', id);
    writeHash(params);
    for (const item of document.querySelectorAll('.job-item')) {
      item.classList.toggle('selected', item.dataset.id === id);
    }
    $('#no-job').hidden = true;
    $('#compare').hidden = true;
    $('#job').hidden = false;
    $('#job-id').textContent = id;
    $('#job-status').textContent = '';  // never show the previous job's status under this id
    $('#job-status').className = 'badge';
    $('#events tbody').replaceChildren();
    $('#checkpoints tbody').replaceChildren();
    $('#evals tbody').replaceChildren();
    $('#evals-section').hidden = true;
    $('#preflight-section').hidden = true;
    $('#preflight-checks tbody').replaceChildren();
    $('#charts').replaceChildren();
    $('#chart-extra').hidden = true;
    $('#extra-metric').value = '';
    refreshJob();
  }

  async function refreshJob() {
    const id = state.selected;
    const generation = state.generation;
    if (!id || !state.key) return;
    let job = state.job;
    let evalsPending = false;
    let preflightPending = false;
    try {
      if (!document.hidden || !job) {
        const [fresh, metrics, events, evals, preflights] = await Promise.all([
          api(jobPath(id)),
          api(jobPath(id, '/metrics'), { max_points: MAX_POINTS }),
          api(jobPath(id, '/events'), { after_id: state.lastEventId }),
          api(jobPath(id, '/evals')),
          api(jobPath(id, '/preflights')),
        ]);
        if (generation !== state.generation) return;
        job = fresh;
        state.job = job;
        updateJobItem(job);
        state.metrics = metrics.metrics;
        renderJob(job);
        appendEvents(events.data);
        renderCharts(job);
        renderEvals(evals.data);
        // the latest pre-flight asked for (POST) wins over the one run before training
        const preflight = preflights.data[preflights.data.length - 1] || null;
        renderPreflight(preflight || state.runFirstPreflight);
        evalsPending = evals.data.some((e) => !EVAL_TERMINAL.has(e.status));
        preflightPending = Boolean(preflight) && !EVAL_TERMINAL.has(preflight.status);
        const checkpointEvents = events.data.filter((e) => e.kind === 'checkpoint').length;
        if (state.checkpointsSeen < 0 || checkpointEvents || TERMINAL.has(job.status)) {
          const checkpoints = await api(jobPath(id, '/checkpoints'));
          if (generation !== state.generation) return;
          renderCheckpoints(checkpoints.data);
        }
        banner('');
      }
    } catch (error) {
      if (generation !== state.generation) return;
      if (error instanceof ApiError && error.status === 404) {
        banner(`Job ${id} was not found for this key.`);
        $('#job').hidden = true;
        $('#no-job').hidden = false;
        state.selected = null;
        return;
      }
      if (handleError(error)) return;
    }
    const live = job && !TERMINAL.has(job.status);
    const indicator = $('#live');
    indicator.hidden = false;
    indicator.classList.toggle('on', Boolean(live));
    indicator.textContent = live
      ? `live · updated ${new Date().toLocaleTimeString()}`
      : `updated ${new Date().toLocaleTimeString()}`;
    if (live || evalsPending || preflightPending || !job) {
      schedule('job', refreshJob, JOB_POLL_MS);
    }
  }

  function eta(job) {
    const total = job.progress.total_steps;
    const step = job.progress.step;
    if (job.status !== 'running' || !total || !step || !job.started_at) return '';
    const elapsed = (Date.now() - new Date(job.started_at).getTime()) / 1000;
    return fmtDuration((elapsed / step) * (total - step));
  }

  function renderJob(job) {
    const status = $('#job-status');
    status.className = `badge s-${job.status}`;
    status.textContent = job.status;
    const spec = job.spec || {};
    let method = spec.method || 'opsd';
    if (method === 'opsd' && spec.divergence) method += ` · ${spec.divergence} (β ${spec.beta})`;
    $('#job-method').textContent = method;

    const total = job.progress.total_steps;
    const fraction = total ? Math.min(1, job.progress.step / total) : 0;
    $('#progress-fill').style.width = `${Math.round(fraction * 100)}%`;
    const left = eta(job);
    const doing = evalActivityText(job);
    $('#progress-text').textContent =
      `step ${stepsText(job)}${left ? ` · ETA ${left}` : ''}${doing ? ` · ${doing}` : ''}`;

    const error = $('#job-error');
    error.hidden = !job.error;
    error.textContent = job.error
      ? `${job.error.code}: ${job.error.message} (${job.error.category} error)`
      : '';

    const link = $('#adapter-link');
    link.hidden = job.status !== 'succeeded';
    link.setAttribute('href', apiUrl(jobPath(job.id, '/adapter')).pathname);

    const rows = [
      ['recipe', spec.recipe || 'none (defaults)'],
      ['base model', spec.base_model],
      ['dataset', spec.dataset_uri],
      ['created', fmtTime(job.created_at)],
      ['started', fmtTime(job.started_at)],
      ['finished', fmtTime(job.finished_at)],
      ['attempt', String(job.attempt)],
    ];
    if (job.started_at && job.finished_at) {
      const ran = (new Date(job.finished_at) - new Date(job.started_at)) / 1000;
      rows.push(['ran for', fmtDuration(ran)]);
    }
    if (job.adapter_uri) rows.push(['adapter', job.adapter_uri]);
    for (const [name, value] of Object.entries(job.metadata || {})) {
      rows.push([`meta: ${name}`, typeof value === 'string' ? value : JSON.stringify(value)]);
    }
    $('#job-meta').replaceChildren(
      ...rows.flatMap(([name, value]) => [
        el('dt', { text: name }),
        el('dd', { text: value === undefined || value === null ? '–' : String(value) }),
      ]),
    );
  }

  // What a running job evaluates (its spec's eval group), from `progress.eval`.
  function evalActivityText(job) {
    const ev = job.progress && job.progress.eval;
    if (job.status !== 'running' || !ev) return '';
    const who = ev.role === 'base' ? 'the base model' : `step ${ev.step}`;
    return `evaluating ${who}: ${ev.done}/${ev.total} problems, ${Number(ev.samples_per_s || 0).toFixed(1)} samples/s`;
  }

  // An eval's own progress for the evaluations table.
  function evalProgressText(evaluation) {
    const p = evaluation.progress;
    if (evaluation.status !== 'running' || !p) return '';
    return `${p.role} ${p.done}/${p.total} · ${Number(p.samples_per_s || 0).toFixed(1)}/s`;
  }

  // ----------------------------------------------------------------------------------- charts
  function chartLayout(title, chart) {
    return {
      title: { text: title, font: { size: 13 }, x: 0.02, xanchor: 'left' },
      margin: { l: 56, r: 14, t: 36, b: 38 },
      height: 230,
      paper_bgcolor: 'rgba(0,0,0,0)',
      plot_bgcolor: 'rgba(0,0,0,0)',
      font: { family: 'system-ui, sans-serif', size: 11, color: '#1d2433' },
      xaxis: { title: { text: 'step', standoff: 4 }, gridcolor: '#eef0f4', zeroline: false },
      yaxis: {
        gridcolor: '#eef0f4', zeroline: false, automargin: true,
        exponentformat: chart && chart.exponent ? 'e' : 'SI',
      },
      showlegend: false,
      legend: { orientation: 'h', x: 0, y: 1.12, font: { size: 10 } },
    };
  }

  function trace(name, series, index) {
    const dense = series.steps.length > 60;
    return {
      type: 'scatter',
      mode: dense ? 'lines' : 'lines+markers',
      name,
      x: series.steps,
      y: series.values,
      line: { color: COLORS[index % COLORS.length], width: 2 },
      marker: { size: 5 },
      hovertemplate: `${name}<br>step %{x}: %{y:.4g}<extra></extra>`,
    };
  }

  function drawChart(node, title, chart, names) {
    const traces = names.map((name, i) => trace(name, state.metrics[name], i));
    const layout = chartLayout(title, chart);
    const inUnit = (t) => t.y.every((v) => v === null || (v >= 0 && v <= 1));
    if (chart && chart.unit && traces.every(inUnit)) layout.yaxis.range = [-0.03, 1.03];
    layout.showlegend = traces.length > 1;
    if (layout.showlegend) layout.margin.t = 52;
    // collapse-guard markers: alarms (red), the best evaluation (green), an early stop (grey)
    layout.shapes = state.markers.map((m) => ({
      type: 'line', xref: 'x', yref: 'paper', x0: m.step, x1: m.step, y0: 0, y1: 1,
      line: { color: MARKER_COLORS[m.kind], width: 1, dash: m.kind === 'alarm' ? 'dot' : 'dash' },
    }));
    layout.annotations = state.markers.map((m) => ({
      xref: 'x', yref: 'paper', x: m.step, y: 1, yanchor: 'bottom', showarrow: false,
      text: m.label, font: { size: 9, color: MARKER_COLORS[m.kind] },
    }));
    Plotly.react(node, traces, layout, {
      displaylogo: false,
      responsive: true,
      modeBarButtonsToRemove: ['lasso2d', 'select2d', 'toImage'],
    });
  }

  function renderCharts() {
    if (typeof Plotly === 'undefined') {
      banner('The chart library did not load; charts are unavailable.');
      return;
    }
    const names = Object.keys(state.metrics).sort();
    const container = $('#charts');
    let shown = 0;
    for (const chart of CHARTS) {
      const series = chart.prefix
        ? names.filter((n) => n.startsWith(chart.prefix))
        : chart.series.filter((n) => state.metrics[n]);
      let node = document.getElementById(`chart-${chart.id}`);
      if (!series.length) {
        if (node) node.hidden = true;
        continue;
      }
      if (!node) {
        node = el('div', { id: `chart-${chart.id}`, class: 'chart', 'data-metric': chart.id });
        container.append(node);
        // keep the declared order whatever arrives first
        const order = CHARTS.map((c) => c.id);
        [...container.children]
          .sort((a, b) => order.indexOf(a.dataset.metric) - order.indexOf(b.dataset.metric))
          .forEach((child) => container.append(child));
      }
      node.hidden = false;
      drawChart(node, chart.title, chart, series);
      shown += 1;
    }
    $('#charts-empty').hidden = shown > 0;
    $('#charts-empty').textContent = noMetricsText(state.job);

    const others = names.filter((n) => !CHARTED.has(n) && !n.startsWith('eval/'));
    const select = $('#extra-metric');
    const current = select.value;
    const wanted = ['', ...others];
    const existing = [...select.options].map((o) => o.value);
    if (wanted.join('\n') !== existing.join('\n')) {
      select.replaceChildren(
        el('option', { value: '', text: 'choose a metric…' }),
        ...others.map((n) => el('option', { value: n, text: n })),
      );
      select.value = others.includes(current) ? current : '';
    }
    $('#extra-row').hidden = others.length === 0;
    renderExtraChart();
  }

  // Why a job has no metrics: it has not reached its first step yet, or it never will.
  function noMetricsText(job) {
    if (job && job.status === 'failed') {
      return 'This job failed before recording any metrics (see its error and events).';
    }
    if (job && job.status === 'cancelled') return 'This job was cancelled before its first step.';
    if (job && job.status === 'succeeded') return 'This job recorded no metrics.';
    return 'No metrics yet: they appear after the first optimizer step.';
  }

  function renderExtraChart() {
    const name = $('#extra-metric').value;
    const node = $('#chart-extra');
    if (!name || !state.metrics[name]) {
      node.hidden = true;
      return;
    }
    node.hidden = false;
    drawChart(node, name, null, [name]);
  }

  // ----------------------------------------------------------------- events and checkpoints
  function appendEvents(events) {
    if (!events.length) return;
    const body = $('#events tbody');
    const wrap = body.closest('.table-wrap');
    const atBottom = wrap.scrollTop + wrap.clientHeight >= wrap.scrollHeight - 4;
    for (const event of events) {
      state.lastEventId = Math.max(state.lastEventId, event.id);
      const data = event.data || {};
      if (MARKER_COLORS[event.kind] && Number.isFinite(data.step)) {
        const label = event.kind === 'alarm' ? data.alarm
          : event.kind === 'best_checkpoint' ? 'best' : 'early stop';
        state.markers.push({ kind: event.kind, step: data.step, label });
      }
      if (event.kind === 'preflight_finished' && event.data && event.data.report) {
        // the spec's preflight.run_first: its report travels in this event
        state.runFirstPreflight = {
          id: 'before training',
          status: 'succeeded',
          report: event.data.report,
          created_at: event.created_at,
        };
      }
      body.append(
        el(
          'tr',
          { 'data-kind': event.kind },
          el('td', { class: 'num', text: String(event.id) }),
          el('td', { class: 'time', text: fmtTime(event.created_at) }),
          el('td', { class: `kind k-${event.kind}`, text: event.kind }),
          el('td', { text: event.message }),
        ),
      );
    }
    if (atBottom) wrap.scrollTop = wrap.scrollHeight;
  }

  function renderCheckpoints(checkpoints) {
    state.checkpointsSeen = checkpoints.length;
    $('#checkpoints tbody').replaceChildren(
      ...checkpoints.map((c) =>
        el(
          'tr',
          { 'data-step': String(c.step) },
          el('td', { class: 'num', text: String(c.step) }),
          el('td', { class: 'time', text: fmtTime(c.created_at) }),
          el('td', { class: 'uri', text: c.uri }),
        ),
      ),
    );
    $('#checkpoints-empty').hidden = checkpoints.length > 0;
  }

  function score(value) {
    return typeof value === 'number' ? value.toFixed(3) : '–';
  }

  function renderEvals(evals) {
    $('#evals-section').hidden = evals.length === 0;
    $('#evals tbody').replaceChildren(
      ...evals.map((e) => {
        const adapter = (e.results && e.results.adapter) || {};
        const base = (e.results && e.results.base) || {};
        const passAt = adapter.pass_at_k || {};
        const n = e.config.n;
        const status = badge(e.status);
        if (e.error) status.title = `${e.error.code}: ${e.error.message}`;
        const doing = evalProgressText(e);
        if (doing) status.append(el('span', { class: 'eval-progress muted', text: ` ${doing}` }));
        return el(
          'tr',
          { 'data-eval': e.id },
          el('td', {}, el('code', { text: e.id })),
          el('td', {}, status),
          el('td', { class: 'uri', text: e.config.dataset_uri || '–' }),
          el('td', { class: 'num', text: String(n ?? '–') }),
          el('td', { text: score(adapter.avg_at_n) }),
          el('td', { text: score(passAt['1']) }),
          el('td', { text: score(passAt[String(n)]) }),
          el('td', { text: score(base.avg_at_n) }),
          el('td', { class: 'time', text: fmtTime(e.created_at) }),
        );
      }),
    );
  }

  // ------------------------------------------------------------------------------ pre-flight
  function pct(value) {
    return typeof value === 'number' ? `${(100 * value).toFixed(1)}%` : 'n/a';
  }

  function renderPreflight(preflight) {
    $('#preflight-section').hidden = !preflight;
    if (!preflight) return;
    const report = preflight.report;
    const verdict = report ? report.status : preflight.status;
    const head = $('#preflight-status');
    head.className = `badge s-${verdict}`;
    head.textContent = verdict;
    let summary;
    if (preflight.error) {
      summary = `could not run: ${preflight.error.code}: ${preflight.error.message}`;
    } else if (!report) {
      const p = preflight.progress;
      summary = p ? `${preflight.status}: ${p.phase} ${p.done}/${p.total}` : preflight.status;
    } else {
      const profile = (report.divergence_profile || []).slice(0, 8).map((v) => v.toFixed(3));
      summary =
        `student without the reference ${pct(report.student_accuracy)}, teacher with it ` +
        `${pct(report.teacher_accuracy)}, privileged gap ${pct(report.gap)} ` +
        `(${report.n_problems} problems × ${report.samples_per_problem}); ` +
        `${report.divergence} on the first tokens: ${profile.join(' ') || '–'}`;
    }
    $('#preflight-summary').textContent = summary;
    $('#preflight-checks tbody').replaceChildren(
      ...((report && report.checks) || []).map((check) =>
        el(
          'tr',
          { 'data-check': check.name },
          el('td', {}, el('code', { text: check.name })),
          el('td', {}, badge(check.status)),
          el('td', { text: check.message }),
          el('td', { class: 'muted', text: check.status === 'pass' ? '' : check.fix || '' }),
        ),
      ),
    );
  }

  // ----------------------------------------------------------------------- adapter download
  async function downloadAdapter(event) {
    event.preventDefault();
    const job = state.job;
    if (!job || job.status !== 'succeeded') return;
    const link = $('#adapter-link');
    const label = link.textContent;
    link.textContent = 'Downloading…';
    try {
      const response = await fetch(apiUrl(jobPath(job.id, '/adapter')), {
        headers: { Authorization: `Bearer ${state.key}` },
      });
      if (!response.ok) throw new ApiError(response.status, await response.json());
      const blob = await response.blob();
      const url = URL.createObjectURL(blob);
      const anchor = el('a', { href: url, download: `${job.id}-adapter.tar.gz` });
      document.body.append(anchor);
      anchor.click();
      setTimeout(() => {
        URL.revokeObjectURL(url);
        anchor.remove();
      }, 2000);
    } catch (error) {
      handleError(error);
    } finally {
      link.textContent = label;
    }
  }

  // ------------------------------------------------------------------------------- start up
  async function start(key) {
    state.key = key;
    showApp();
    const wanted = hashParams().get('job');
    await refreshList();
    if (!state.key) return;
    if (wanted) selectJob(wanted);
  }

  function signOut() {
    localStorage.removeItem(KEY_STORE);
    state.selected = null;
    state.job = null;
    showLogin('');
  }

  function init() {
    takeKeyFromUrl();
    $('#key-form').addEventListener('submit', (event) => {
      event.preventDefault();
      const key = $('#key-input').value.trim();
      if (!key) return;
      localStorage.setItem(KEY_STORE, key);
      $('#key-input').value = '';
      start(key);
    });
    $('#sign-out').addEventListener('click', signOut);
    $('#more').addEventListener('click', loadMore);
    $('#adapter-link').addEventListener('click', downloadAdapter);
    $('#extra-metric').addEventListener('change', renderExtraChart);
    $('#compare-open').addEventListener('click', openCompare);
    $('#compare-close').addEventListener('click', closeCompare);
    $('#compare-metric').addEventListener('change', renderCompare);
    $('#status-filter').addEventListener('change', (event) => {
      state.statusFilter = event.target.value;
      refreshList();
    });
    // a pasted link or the back button changes the job in the URL: follow it without a reload
    window.addEventListener('hashchange', () => {
      const wanted = hashParams().get('job');
      if (state.key && wanted && wanted !== state.selected) selectJob(wanted);
    });
    document.addEventListener('visibilitychange', () => {
      if (document.hidden || !state.key) return;
      refreshList();
      if (state.selected) refreshJob();
    });
    const key = localStorage.getItem(KEY_STORE);
    if (key) start(key);
    else showLogin('');
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
  else init();
})();
