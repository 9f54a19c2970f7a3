// Tracing: the Tracer hook, which follows each call with the caller's
// context, and the events it is told of. The Recorder, its counterpart for
// metrics, is in metrics.go.

package cacheaside

import "context"

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
