// The throughput chart (uPlot, vendored): tasks submitted, succeeded and failed per second.

import uPlot from "../../vendor/uplot/uPlot.esm.js";
import { $ } from "../dom.js";

let plot = null;

function size() {
  const el = $("chart");
  return { width: Math.max(el.clientWidth, 300), height: 220 };
}

export function setupChart(model) {
  const axis = { stroke: "#8b95a3", grid: { stroke: "#252c35", width: 1 }, ticks: { stroke: "#2a313b", width: 1 } };
  const opts = {
    ...size(),
    cursor: { drag: { x: false, y: false } },
    scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(5, max * 1.15)] } },
    axes: [{ ...axis }, { ...axis, size: 56 }],
    series: [
      {},
      { label: "submitted", stroke: "#6cb6ff", width: 1.5, points: { show: false } },
      { label: "succeeded", stroke: "#4cc38a", width: 2, fill: "rgba(76,195,138,0.12)", points: { show: false } },
      { label: "failed", stroke: "#f2555a", width: 1.5, points: { show: false } },
    ],
    legend: { live: true },
  };
  plot = new uPlot(opts, model.series(), $("chart"));
  new ResizeObserver(() => plot.setSize(size())).observe($("chart"));
}

export function renderChart(model) {
  if (plot) plot.setData(model.series());
}
