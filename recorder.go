// Instrumentation hooks: the Recorder (counts, for metrics) and the Tracer
// (the caller's context, for traces), and their no-op defaults.

package cacheaside

import (
	"context"
	"time"
)

// Recorder receives every event a Cache counts, as it is counted, for
// export to a metrics system that wants events rather than totals (the
// cacheotel module's load-duration histogram is one; cacheprometheus reads
// Stats at scrape time instead and needs no Recorder). cache is
// Options.Name; raw keys are never passed, so labels stay low-cardinality.
// Methods are called on the request path and must be fast and safe for
// concurrent use. Embed NopRecorder to implement only some of them.
//
// Every field of Stats has its Recorder method, called from the same place
// that counts it, so the two never disagree; the exceptions are derived:
// Loads, LoadErrors, LoadTime and LoadsWithin come from Load, Refreshes and
// RefreshErrors from Refresh, BreakerOpens from BreakerState("open"), and
// PendingInvals, Breaker, LocalLive and LocalEntries are states read when
// Stats is called.
type Recorder interface {
	// Hit: the first read found a value (in Redis, or in the local tier,
	// when LocalHit follows).
	Hit(cache string)
	// NegativeHit: the first read found a "not found" tombstone (in Redis,
	// or in the local tier, when LocalNegativeHit follows).
	NegativeHit(cache string)
	// LocalHit: the local tier answered a Get with a value (after Hit).
	LocalHit(cache string)
	// LocalNegativeHit: the local tier answered a Get with "not found"
	// (after NegativeHit).
	LocalNegativeHit(cache string)
	// Miss: the first read found no usable entry (absent, being loaded,
	// corrupt, or Redis failed).
	Miss(cache string)
	// Load: the loader returned after d with err: nil, the loader's own
	// error as returned (including its "not found" error, before mapping to
	// ErrNotFound), a *PanicError, or a timeout. A GetMany's batch loader
	// counts as one load.
	Load(cache string, d time.Duration, err error)
	// Coalesced: this Get (or a GetMany's key) joined an in-process load
	// another Get started, instead of loading.
	Coalesced(cache string)
	// LeaseContended: keys that another caller (usually another process)
	// held the lease on, so this Get or GetMany waited for their fills
	// instead of loading them.
	LeaseContended(cache string, keys int)
	// Waited: a wait for other holders' fills ended after d.
	Waited(cache string, d time.Duration)
	// FillRejected: a fill found its lease gone (invalidated, overwritten
	// or expired and re-taken) and wrote nothing.
	FillRejected(cache string)
	// NotCached: a loaded value was returned but not cached because it
	// encoded to more than Options.MaxValueSize or could not be encoded.
	NotCached(cache string)
	// DecodeError: the bytes under a key could not be decoded; the key is
	// treated as a miss and overwritten.
	DecodeError(cache string)
	// RedisError: a Redis call was sent and failed (an error reply, a
	// timeout, a broken connection); a pipeline is one call. op names the
	// step ("get", "acquire", "fill", "release", ...). Commands that were
	// not sent are not errors: see RedisSkipped.
	RedisError(cache, op string, err error)
	// RedisSkipped: a command was not sent, because the breaker is open
	// or the Get had spent its Degradation.RedisTimePerGet.
	RedisSkipped(cache string)
	// StaleServed: a value past its TTL was returned from inside the
	// stale-while-revalidate window.
	StaleServed(cache string)
	// StaleIfError: a value past its TTL was returned because its reload
	// failed inside the stale-if-error window.
	StaleIfError(cache string)
	// Refresh: a background refresh (early or stale-while-revalidate)
	// ended with err (nil, ErrNotFound, or the failure).
	Refresh(cache string, err error)
	// BreakerState: the worst state of the cache's Redis circuit breakers
	// (one per node and direction, see Stats.Breaker) moved to state
	// ("closed", "open" or "half-open").
	BreakerState(cache, state string)
	// Invalidated: n keys were deleted by Invalidate or InvalidatePrefix.
	Invalidated(cache string, n int)
	// NamespaceBumped: InvalidateNamespace gave a namespace a new
	// generation.
	NamespaceBumped(cache string)
	// InvalidationQueued: an invalidation failed and was queued for retry
	// (see Degradation.RetryInvalidations).
	InvalidationQueued(cache string)
	// InvalidationRetried: a failed invalidation was applied by a retry.
	InvalidationRetried(cache string)
	// InvalidationDropped: a failed invalidation was given up (too old, or
	// the retry queue was full).
	InvalidationDropped(cache string)
	// Overloaded: a Get was refused with ErrOverloaded.
	Overloaded(cache string)
	// LocalFlushed: the local tier was emptied (bus lost or regained, an
	// unreadable message).
	LocalFlushed(cache string)
	// BusMessage: an invalidation message arrived from the bus.
	BusMessage(cache string)
}

// NopRecorder does nothing. It is the default Recorder, and embedding it
// lets a type implement only the Recorder methods it cares about.
type NopRecorder struct{}

func (NopRecorder) Hit(string)                        {}
func (NopRecorder) NegativeHit(string)                {}
func (NopRecorder) LocalHit(string)                   {}
func (NopRecorder) LocalNegativeHit(string)           {}
func (NopRecorder) Miss(string)                       {}
func (NopRecorder) Load(string, time.Duration, error) {}
func (NopRecorder) Coalesced(string)                  {}
func (NopRecorder) LeaseContended(string, int)        {}
func (NopRecorder) Waited(string, time.Duration)      {}
func (NopRecorder) FillRejected(string)               {}
func (NopRecorder) NotCached(string)                  {}
func (NopRecorder) DecodeError(string)                {}
func (NopRecorder) RedisError(string, string, error)  {}
func (NopRecorder) RedisSkipped(string)               {}
func (NopRecorder) StaleServed(string)                {}
func (NopRecorder) StaleIfError(string)               {}
func (NopRecorder) Refresh(string, error)             {}
func (NopRecorder) BreakerState(string, string)       {}
func (NopRecorder) Invalidated(string, int)           {}
func (NopRecorder) NamespaceBumped(string)            {}
func (NopRecorder) InvalidationQueued(string)         {}
func (NopRecorder) InvalidationRetried(string)        {}
func (NopRecorder) InvalidationDropped(string)        {}
func (NopRecorder) Overloaded(string)                 {}
func (NopRecorder) LocalFlushed(string)               {}
func (NopRecorder) BusMessage(string)                 {}

var _ Recorder = NopRecorder{}

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
// lease rounds, waits and fills (EventLeaseWait, EventServedStale,
// EventStaleIfError, Redis failures) carry the context of the caller that
// leads it, and may come after that caller has returned (it gave up on its
// own deadline); the callers that joined it see EventCoalesced. Background
// work (refreshes, retried invalidations, releases, the bus) has no caller
// and sends no events; a background refresh's loader call is traced
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

// CallKind says what a traced call is.
type CallKind uint8

const (
	CallGet     CallKind = iota + 1 // a Get
	CallGetMany                     // a GetMany
	CallLoad                        // one loader call (a Get's loader, or a GetMany's batch loader)
)

// String returns "get", "getmany" or "load".
func (k CallKind) String() string {
	switch k {
	case CallGet:
		return "get"
	case CallGetMany:
		return "getmany"
	case CallLoad:
		return "load"
	}
	return "unknown"
}

// Call describes a traced call.
type Call struct {
	Kind  CallKind
	Cache string // Options.Name
	Key   string // the key of a Get or of a one-key load; "" for more keys
	Keys  int    // 1 for a Get, the ids passed to a GetMany, the keys of a load

	// Background marks the loader call of a background refresh (early
	// refresh or stale-while-revalidate). Its context derives from the Get
	// that started it, which may have returned: the call is not that
	// Get's load.
	Background bool
}

// EventKind says what happened inside a traced call.
type EventKind uint8

const (
	EventHit              EventKind = iota + 1 // the first read found a fresh value in Redis
	EventLocalHit                              // the local tier answered with a value
	EventNegativeHit                           // the first read found a "not found" tombstone in Redis
	EventLocalNegativeHit                      // the local tier answered "not found"
	EventStale                                 // the first read found a value past its TTL and served it (stale-while-revalidate)
	EventStaleIfError                          // a value past its TTL was served because its reload failed
	EventMiss                                  // the first read found nothing usable: the key is loaded or waited for
	EventCoalesced                             // the call shared a load another call in this process runs
	EventLeaseWait                             // the call waited for Keys keys whose leases others hold
	EventRedisError                            // a Redis command (Op) was sent and failed with Err
	EventRedisSkipped                          // a Redis command (Op) was not sent: Err says why (breaker open, Redis time spent)
	EventOverloaded                            // the call was refused a load slot: ErrOverloaded
	EventServedStale                           // a key that missed was answered with a value past its TTL the lease round found (after EventMiss)
)

var eventNames = [...]string{"", "hit", "local_hit", "negative_hit", "local_negative_hit", "stale", "stale_if_error",
	"miss", "coalesced", "lease_wait", "redis_error", "redis_skipped", "overloaded", "served_stale"}

// String returns the event's name in snake case ("hit", "local_hit",
// "redis_error", ...).
func (k EventKind) String() string {
	if int(k) < len(eventNames) && k != 0 {
		return eventNames[k]
	}
	return "unknown"
}

// Event is one thing that happened inside a traced call.
type Event struct {
	Kind EventKind
	Op   string // the Redis step of EventRedisError and EventRedisSkipped ("get", "acquire", "fill", ...)
	Err  error  // the error of EventRedisError and EventRedisSkipped
	Keys int    // EventLeaseWait: how many keys
}
