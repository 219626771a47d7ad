/** The `mla-decode` command: dispatch to a command, and the exit status. */

import { MlaError } from '../../index'
import { UsageError, version } from './args'
import { cmdBench } from './commands/bench'
import { cmdInfo } from './commands/info'
import { HELP } from './help'

export async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv
  switch (cmd) {
    case undefined:
    case '-h':
    case '--help':
    case 'help':
      console.log(HELP)
      return cmd === undefined ? 2 : 0
    case '-v':
    case '--version':
      console.log(version())
      return 0
    case 'bench':
      return cmdBench(rest)
    case 'info':
      return cmdInfo(rest)
    default:
      throw new UsageError(`unknown command '${cmd}' (expected bench, info or --help)`)
  }
}

/** Runs the command line `argv` (without node and the script) and sets the exit status: 0 done, 1 a failure, 2 a usage error. */
export function run(argv: string[]): void {
  main(argv).then(
    (code) => {
      process.exitCode = code
    },
    (e: unknown) => {
      const usage = e instanceof UsageError || (e instanceof Error && (e as { code?: string }).code?.startsWith('ERR_PARSE_ARGS'))
      if (e instanceof MlaError) console.error(`mla-decode: ${e.code}: ${e.message}`)
      else console.error(`mla-decode: ${e instanceof Error ? e.message : String(e)}`)
      if (usage) console.error("run 'mla-decode --help' for the options")
      process.exitCode = usage ? 2 : 1
    },
  )
}
