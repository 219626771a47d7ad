/** The benchmark's progress: one line per configuration, and an in-place bar on a TTY. */

function clock(ms: number): string {
  const s = Math.round(ms / 1000)
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, '0')}`
}

// Progress: one line per configuration on stdout; on a TTY also an in-place bar on stderr.

export class Progress {
  private timer: NodeJS.Timeout | undefined
  private current = ''
  private done = 0
  private started = Date.now()
  private configStarted = Date.now()
  constructor(
    private readonly total: number,
    private readonly live: boolean,
  ) {}

  begin(what: string, done: number): void {
    this.current = what
    this.done = done
    this.configStarted = Date.now()
    if (!this.live) return
    this.draw()
    this.timer ??= setInterval(() => this.draw(), 200)
    this.timer.unref()
  }

  private draw(): void {
    const cols = process.stderr.columns || 100
    const width = 24
    const filled = Math.round((width * this.done) / Math.max(1, this.total))
    const bar = '█'.repeat(filled) + '░'.repeat(width - filled)
    const now = Date.now()
    let line = `  ${bar} ${this.done}/${this.total}  ${this.current}  ${((now - this.configStarted) / 1000).toFixed(1)} s  (elapsed ${clock(now - this.started)})`
    if (line.length > cols - 1) line = line.slice(0, cols - 1)
    process.stderr.write(`\r\x1b[K${line}`)
  }

  /** Prints a line where the bar was (the next begin() or tick draws the bar again below it). */
  log(line: string): void {
    if (this.live) process.stderr.write('\r\x1b[K')
    process.stdout.write(line + '\n')
  }

  end(): void {
    if (this.timer) clearInterval(this.timer)
    this.timer = undefined
    if (this.live) process.stderr.write('\r\x1b[K')
  }
}
