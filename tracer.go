// Events and tracing: Event, the one vocabulary the Recorder (metrics.go)
// and the Tracer are told in, and the Tracer hook, which follows each call
// with the caller's context.

package cacheaside

import (
	"context"
	"time"
)

// Event is one thing that happened in a Cache, as the Recorder and the
// Tracer are told of it. Kind says what:
//
//	first read of a Get (or of a GetMany's key); exactly one of these per key:
//	  hit                 a fresh value in Redis
//	  local_hit           a value in the local tier
//	  negative_hit        a "not found" tombstone in Redis
//	  local_negative_hit  "not found" in the local tier
//	  stale               a value past its TTL, served (stale-while-revalidate)
//	  miss                nothing usable: the key is loaded or waited for
//	after a miss:
//	  coalesced           the key shared a load another call of this process runs
//	  lease_wait          N keys waited for leases other callers hold
//	  waited              a wait for other holders' fills ended after D
//	  served_stale        the key was answered with a value past its TTL a lease round found
//	  stale_if_error      a value past its TTL was served because its reload failed (Err)
//	  soft_timeout        the old value answered the key: its reload ran past SoftLoadTimeout
//	  unchanged           a reload's value came back the same: the entry was kept, its life extended
//	  overloaded          the call was refused a load slot: ErrOverloaded
//	  load                a loader call returned after D with Err (nil, the loader's
//	                      own error, a *PanicError or a timeout); a batch is one call
//	  fill_rejected       a fill found its lease gone and wrote nothing
//	  not_cached          a loaded value was returned but too large or unencodable to cache
//	  decode_error        the bytes under a key could not be decoded (a miss, overwritten)
//	Redis:
//	  redis_error         a command (Op: "get", "acquire", "fill", ...) was sent and failed with Err
//	  redis_skipped       a command was not sent: a breaker was open, or the Get's Redis time was
//	                      spent (the Tracer's carry Op and Err; the Recorder's are counts)
//	  starved             a command (Op) timed out because this process was not scheduled in time
//	                      (its deadline fired long after it was due): not a Redis failure, and
//	                      the Get goes on with Redis
//	  breaker_state       the worst of the circuit breakers moved to State ("closed", "open",
//	                      "half-open")
//	background:
//	  refresh             a background refresh that ran its loader ended with Err
//	  invalidated         N keys deleted by Invalidate or InvalidatePrefix
//	  namespace_bumped    InvalidateNamespace gave a namespace a new generation
//	  invalidation_queued, invalidation_retried, invalidation_dropped
//	                      a failed invalidation queued for retry, applied by a retry, given up
//	  local_flushed       the local tier was emptied (bus lost or regained, unreadable message)
//	  bus_message         an invalidation message from the bus was applied to the local tier
//
// Stats counts the same events: hit, local_hit and stale count in Hits (and
// stale in StaleServed), negative_hit and local_negative_hit in
// NegativeHits, and so on. The Recorder is told of every event; the Tracer
// of those that happen inside a traced call, with its context: the first
// two groups but load (a Call of its own) and waited, and redis_error,
// redis_skipped and starved.
type Event struct {
	Kind  string
	Cache string        // Options.Name
	N     int           // lease_wait and invalidated: how many keys
	D     time.Duration // load and waited: how long
	Op    string        // redis_error and redis_skipped: the Redis step
	State string        // breaker_state: the state now
	Err   error         // load, refresh, stale_if_error, redis_error, redis_skipped
}

// Tracer follows each Get, GetMany and loader call with the caller's
// context, for tracing (the cacheotel module builds OpenTelemetry spans
// with it). Set it in Options.Tracer; when it is nil nothing of this runs
// and the hit path costs what it costs without it.
//
// Start is called as a call begins and returns the context for the rest
// of it: the events inside the call and, for a Get or GetMany that loads,
// the loader's own call (whose context derives from it, so a loader span
// is the child of the Get's span). End is called with that context when
// the call returns. Event reports what happened inside a call, with the
// context of the call it belongs to. A load is shared: the events of its
// lease rounds, waits and fills carry the context of the caller that leads
// it, and may come after that caller has returned (it gave up on its own
// deadline); the callers that joined it see coalesced. Background work
// (refreshes, retried invalidations, releases, the bus) has no caller and
// sends no events; a background refresh's loader call is traced
// (Call.Background), with a context derived from the Get that started it.
//
// Methods are called on the request path, from several goroutines at
// once, and must be fast. Keys reach the Tracer in Call.Key; an
// implementation should not export them unless its user opts in.
type Tracer interface {
	Start(ctx context.Context, call Call) context.Context
	Event(ctx context.Context, ev Event)
	End(ctx context.Context, call Call, err error)
}

// Call describes a traced call.
type Call struct {
	Kind  string // "get", "getmany", or "load" (one loader call: a Get's loader, or a GetMany's batch loader)
	Cache string // Options.Name
	Key   string // the key of a Get or of a one-key load; "" for more keys
	Keys  int    // 1 for a Get, the ids passed to a GetMany, the keys of a load

	// Background marks the loader call of a background refresh (early
	// refresh or stale-while-revalidate). Its context derives from the Get
	// that started it, which may have returned: the call is not that
	// Get's load.
	Background bool
}

// The kinds of Call and Event.
const (
	callGet     = "get"
	callGetMany = "getmany"
	callLoad    = "load"

	evHit              = "hit"
	evLocalHit         = "local_hit"
	evNegativeHit      = "negative_hit"
	evLocalNegativeHit = "local_negative_hit"
	evStale            = "stale"
	evMiss             = "miss"
	evCoalesced        = "coalesced"
	evLeaseWait        = "lease_wait"
	evWaited           = "waited"
	evServedStale      = "served_stale"
	evStaleIfError     = "stale_if_error"
	evSoftTimeout      = "soft_timeout"
	evUnchanged        = "unchanged"
	evOverloaded       = "overloaded"
	evLoad             = "load"
	evFillRejected     = "fill_rejected"
	evNotCached        = "not_cached"
	evDecodeError      = "decode_error"
	evRedisError       = "redis_error"
	evRedisSkipped     = "redis_skipped"
	evStarved          = "starved"
	evBreakerState     = "breaker_state"
	evRefresh          = "refresh"
	evInvalidated      = "invalidated"
	evNamespaceBumped  = "namespace_bumped"
	evInvalQueued      = "invalidation_queued"
	evInvalRetried     = "invalidation_retried"
	evInvalDropped     = "invalidation_dropped"
	evLocalFlushed     = "local_flushed"
	evBusMessage       = "bus_message"
)
