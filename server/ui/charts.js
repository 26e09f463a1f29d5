// Line charts as SVG built through the DOM (no library, no inline style: attributes and CSS classes only).

const SVG = "http://www.w3.org/2000/svg";

function node(tag, attrs, text) {
  const n = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
  if (text !== undefined) n.textContent = text;
  return n;
}

function nice(v) {
  if (!Number.isFinite(v)) return "–";
  const a = Math.abs(v);
  if (a >= 100 || Number.isInteger(v)) return String(Math.round(v));
  return a >= 1 ? v.toFixed(2) : v.toPrecision(3);
}

/**
 * Draw `points` ([x, y] pairs) into `container`, replacing what was there. x runs from `xMin` to
 * `xMax` (default: the points' range); y from `yMin` (default 0, or the lowest point when
 * `fitY`) to the highest point (at least `yMax`).
 */
export function lineChart(container, points, { title = "", xMin, xMax, yMin, yMax = 0, fitY = false,
                                                  unit = "", width = 320, height = 120 } = {}) {
  const pad = { l: 40, r: 8, t: 26, b: 16 };
  const svg = node("svg", { viewBox: `0 0 ${width} ${height}`, class: "line-chart", role: "img",
                            "aria-label": title });
  const xs = points.map((p) => p[0]);
  const ys = points.map((p) => p[1]).filter(Number.isFinite);
  const x0 = xMin ?? (xs.length ? Math.min(...xs) : 0);
  const x1 = Math.max(xMax ?? -Infinity, xs.length ? Math.max(...xs) : 1, x0 + 1e-9);
  let y0 = yMin ?? (fitY && ys.length ? Math.min(...ys) : 0);
  let y1 = Math.max(yMax, ys.length ? Math.max(...ys) : 1);
  if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; }
  const X = (x) => pad.l + ((x - x0) / (x1 - x0)) * (width - pad.l - pad.r);
  const Y = (y) => height - pad.b - ((y - y0) / (y1 - y0)) * (height - pad.t - pad.b);
  svg.append(node("text", { x: 2, y: 12, class: "chart-title" }, title));
  const last = points.length ? points[points.length - 1][1] : NaN;
  svg.append(node("text", { x: width - 4, y: 12, class: "chart-value", "text-anchor": "end" },
                  points.length ? `${nice(last)}${unit}` : "no data"));
  for (const y of [y0, y1]) {
    svg.append(node("line", { x1: pad.l, x2: width - pad.r, y1: Y(y), y2: Y(y), class: "chart-grid" }));
    svg.append(node("text", { x: pad.l - 4, y: Y(y) + 4, class: "chart-axis", "text-anchor": "end" }, nice(y)));
  }
  const drawn = points.filter((p) => Number.isFinite(p[1]));
  if (drawn.length) {
    const d = drawn.map((p, i) => `${i ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join("");
    svg.append(node("path", { d, class: "chart-line" }));
    for (const p of drawn.length <= 60 ? drawn : drawn.slice(-1)) {
      svg.append(node("circle", { cx: X(p[0]).toFixed(1), cy: Y(p[1]).toFixed(1), r: 2.5, class: "chart-dot" }));
    }
  }
  container.replaceChildren(svg);
  return svg;
}
