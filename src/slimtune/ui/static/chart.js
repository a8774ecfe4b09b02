// A small line chart on a canvas: train loss per step (line) and eval loss (dots), over the
// run's total steps when known, so the curve grows across the chart as the run trains.
"use strict";

function drawLossChart(canvas, losses, evals, totalSteps) {
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || canvas.width, h = canvas.clientHeight || canvas.height;
  canvas.width = w * ratio; canvas.height = h * ratio;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, w, h);
  ctx.font = "12px system-ui, sans-serif";
  const pad = { l: 52, r: 14, t: 14, b: 30 };
  const points = losses.concat(evals);
  if (!points.length) {
    ctx.fillStyle = "#6b7385";
    ctx.fillText("no steps logged yet", pad.l, h / 2);
    return;
  }
  const xmax = Math.max(...points.map(p => p[0]), totalSteps || 1, 1);  // the whole run's width
  let ymin = Math.min(...points.map(p => p[1])), ymax = Math.max(...points.map(p => p[1]));
  if (ymax - ymin < 1e-9) { ymin -= 0.5; ymax += 0.5; }
  const span = ymax - ymin; ymin -= span * 0.05; ymax += span * 0.05;
  const X = s => pad.l + (s / xmax) * (w - pad.l - pad.r);
  const Y = v => pad.t + (1 - (v - ymin) / (ymax - ymin)) * (h - pad.t - pad.b);

  ctx.strokeStyle = "#dde1e8"; ctx.fillStyle = "#6b7385"; ctx.lineWidth = 1;
  for (const v of ticks(ymin, ymax, 5)) {
    ctx.beginPath(); ctx.moveTo(pad.l, Y(v)); ctx.lineTo(w - pad.r, Y(v)); ctx.stroke();
    ctx.fillText(v.toPrecision(3), 4, Y(v) + 4);
  }
  for (const s of ticks(0, xmax, 6).filter(s => Number.isInteger(s))) {
    ctx.fillText(String(s), X(s) - 4, h - pad.b + 16);
  }
  ctx.fillText("step", w - pad.r - 28, h - 4);

  if (losses.length) {
    ctx.strokeStyle = "#2f6fde"; ctx.lineWidth = 1.6; ctx.beginPath();
    losses.forEach((p, i) => (i ? ctx.lineTo(X(p[0]), Y(p[1])) : ctx.moveTo(X(p[0]), Y(p[1]))));
    ctx.stroke();
    if (losses.length === 1) { ctx.fillStyle = "#2f6fde"; dot(ctx, X(losses[0][0]), Y(losses[0][1]), 3); }
  }
  ctx.fillStyle = "#e0782f";
  for (const p of evals) dot(ctx, X(p[0]), Y(p[1]), 4);

  ctx.fillStyle = "#2f6fde"; ctx.fillRect(w - 170, 10, 12, 3);
  ctx.fillStyle = "#1d2330"; ctx.fillText("train loss", w - 152, 15);
  ctx.fillStyle = "#e0782f"; dot(ctx, w - 84, 12, 4);
  ctx.fillStyle = "#1d2330"; ctx.fillText("eval loss", w - 74, 15);
}

function dot(ctx, x, y, r) { ctx.beginPath(); ctx.arc(x, y, r, 0, 2 * Math.PI); ctx.fill(); }

function ticks(lo, hi, n) {
  const raw = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map(m => m * mag).find(s => s >= raw) || raw;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-12; v += step) out.push(+v.toPrecision(12));
  return out;
}
