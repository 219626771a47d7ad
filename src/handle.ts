/**
 * The base of every class that wraps a native handle (the classes of the generated
 * binding): the handle itself, the wrapping of one, `disposed`, `dispose()`,
 * `[Symbol.dispose]()` and what `util.inspect` / `console.log` show.
 */

import { MlaError } from './errors'

// Node >= 20.4 defines Symbol.dispose; older runtimes get the conventional polyfill. This
// module defines the first `[Symbol.dispose]` method, so the polyfill runs here, before it.
;(Symbol as { dispose?: symbol }).dispose ??= Symbol.for('Symbol.dispose')

/** What every native handle class of the binding has. */
export interface NativeHandle {
  readonly disposed: boolean
  dispose(): void
}

/**
 * A JS object that owns one reference to a native handle. Subclasses narrow `_n` to their
 * native class (`declare readonly _n: Native.X`, so that the published .d.ts never names
 * the binding), keep a private constructor taking the native handle (or a public one that
 * makes it), and say what `util.inspect` shows of them ({@link _inspect}).
 */
export abstract class Handle {
  /** @internal */
  readonly _n: NativeHandle

  protected constructor(n: NativeHandle) {
    this._n = n
  }

  /** @internal A native handle wrapped in this class (one whose constructor takes it). */
  static _wrap<H extends Handle>(this: { prototype: H }, n: H['_n']): H {
    return new (this as unknown as new (n: H['_n']) => H)(n)
  }

  /** Whether {@link dispose} was called. */
  get disposed(): boolean {
    return this._n.disposed
  }

  /** Releases this handle. */
  dispose(): void {
    this._n.dispose()
  }

  /** Same as {@link dispose} (for `using`). */
  [Symbol.dispose](): void {
    this.dispose()
  }

  /** @internal The fields `util.inspect` shows of a live handle (it may throw: then the error code is shown). */
  abstract _inspect(): Record<string, unknown>
}

// util.inspect / console.log: show what an object is (the handles' fields are native and
// would print as `Tensor { _n: Tensor {} }`). Set on the prototype, not declared in the
// class, so that the published .d.ts stays as it is.
type Inspect = (v: unknown, o: object) => string
Object.defineProperty(Handle.prototype, Symbol.for('nodejs.util.inspect.custom'), {
  value(this: Handle, _depth: number, options: object, inspect: Inspect): string {
    const name = this.constructor.name
    if (this.disposed) return `${name} <disposed>`
    try {
      return `${name} ${inspect(this._inspect(), options)}`
    } catch (e) {
      return `${name} <${e instanceof MlaError ? e.code : 'error'}>`
    }
  },
})
