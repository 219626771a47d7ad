#!/usr/bin/env node
/**
 * The `mla-decode` command (package bin, compiled to dist/cli.js):
 *
 *   mla-decode bench [options]   FlashMLA's benchmark grid and beyond-grid shapes, with the
 *                                copy ceiling of the same run; a table, bench.csv, bench.svg
 *   mla-decode bench --host      the host benchmark: decode steps driven from TypeScript
 *                                (await, sync, enqueue, graph) vs the kernels' own time;
 *                                host.csv, host-ops.csv
 *   mla-decode bench --host-breakdown   where the host time of one call goes (phases of
 *                                an awaited decode, an enqueued step, appendBatch);
 *                                host-breakdown.csv
 *   mla-decode info [--device]   GPU status and device facts
 *   mla-decode --help
 *
 * Everything it measures comes from the package's `bench` API (the Rust core's
 * `mla_core::bench`); the command only parses flags, shows progress and writes files. It
 * lives in src/cli/: args.ts and help.ts (parsing, usage), report.ts (table, CSVs),
 * chart.ts (bench.svg), progress.ts, commands/ (bench, host, host-breakdown, info) and
 * main.ts (dispatch, exit status); this file is the entry.
 */

import { run } from './src/cli/main'

export { svgChart } from './src/cli/chart'
export {
  HOST_BREAKDOWN_CSV_HEADER,
  HOST_CSV_HEADER,
  HOST_OPS_CSV_HEADER,
  hostBreakdownCsv,
  hostCsv,
  hostOpsCsv,
  type Row,
} from './src/cli/report'

if (require.main === module) run(process.argv.slice(2))
