// The circuit breakers: one per Redis node and direction (reads, writes),
// so a dead Cluster master or a write stall is skipped without sending
// every other command to the loader.

package cacheaside

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/sony/gobreaker/v2"
)

// Failure is counted where it happens. A Cache keeps a breaker
// (github.com/sony/gobreaker/v2) for each Redis node it sends commands to,
// and for each direction:
//
//   - reads (GET, MGET, SCAN): what a hit needs;
//   - writes (the lease scripts, fills, releases, SET, UNLINK, PUBLISH).
//
// So a write stall (CLIENT PAUSE WRITE, a replica promoted to master that
// still loads, a full disk with min-replicas) opens the write breaker while
// hits go on being served, and a dead Cluster master opens its own breakers
// while the keys on the other masters stay in Redis. The node is the
// master that serves the command's key on a client with MasterForKey
// (*redis.ClusterClient and wrappers of it), and the client's one address
// everywhere else (a Client, a failover client, a Ring). On a Cluster, a
// failed command also asks the client to reload its slot map
// (ReloadState), so a master's failover is followed within a reload and
// not after ClusterStateReloadInterval.

// direction says which breaker of a node a command goes through.
type direction uint8

const (
	reads  direction = iota // GET, MGET, SCAN
	writes                  // scripts, SET, UNLINK, PUBLISH
)

func (d direction) String() string {
	if d == reads {
		return "reads"
	}
	return "writes"
}

type breakerID struct {
	node string // "" for the client's one node, or a keyless command
	dir  direction
}

// breaker is the breaker of one node and direction.
type breaker = gobreaker.TwoStepCircuitBreaker[struct{}]

// breakerSettings are what every breaker of a cache is built with.
type breakerSettings struct {
	name     string
	failures int
	cooldown time.Duration
	log      *slog.Logger
	ev       *events
	logs     *logGate
}

// breakers holds a cache's breakers, made on first use.
type breakers struct {
	st     breakerSettings
	route  func(ctx context.Context, key string) string // the node serving key; nil: one node
	reload func()                                       // ask the client to reload its slot map; nil: not a Cluster

	lastReload atomic.Int64 // UnixNano of the last reload asked for

	one [2]*breaker // without route: the client's one node, by direction

	mu        sync.RWMutex
	m         map[breakerID]*breaker
	states    map[breakerID]gobreaker.State // the breakers not closed
	downSince map[string]time.Time          // node → when its first breaker opened
	summary   string                        // the state last reported to the Recorder
}

// masterForKey is the method of *redis.ClusterClient that names the node
// serving a key.
type masterForKey interface {
	MasterForKey(ctx context.Context, key string) (*redis.Client, error)
}

// stateReloader is the method of *redis.ClusterClient that reloads its
// slot map in the background.
type stateReloader interface {
	ReloadState(ctx context.Context)
}

func newBreakers(rdb Redis, st breakerSettings) *breakers {
	b := &breakers{st: st, m: make(map[breakerID]*breaker), states: make(map[breakerID]gobreaker.State),
		downSince: make(map[string]time.Time), summary: gobreaker.StateClosed.String()}
	if mk, ok := rdb.(masterForKey); ok {
		b.route = func(ctx context.Context, key string) string {
			if key == "" {
				return ""
			}
			cl, err := mk.MasterForKey(ctx, key)
			if err != nil {
				return "" // no slot map: the keyless breaker answers for the cluster
			}
			return cl.Options().Addr
		}
	}
	if r, ok := rdb.(stateReloader); ok {
		b.reload = func() { r.ReloadState(context.Background()) }
	}
	if b.route == nil { // every command goes to one node: no lookup on the hit path
		for _, d := range []direction{reads, writes} {
			id := breakerID{dir: d}
			b.one[d] = b.newBreaker(id)
			b.m[id] = b.one[d]
		}
	}
	return b
}

// get returns the breaker for a command of direction d on key ("" for a
// keyless command). ctx bounds the slot-map lookup of a Cluster client
// that has none yet.
func (b *breakers) get(ctx context.Context, d direction, key string) *breaker {
	if b.route == nil {
		return b.one[d]
	}
	id := breakerID{node: b.route(ctx, key), dir: d}
	b.mu.RLock()
	nb := b.m[id]
	b.mu.RUnlock()
	if nb != nil {
		return nb
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if nb = b.m[id]; nb == nil {
		nb = b.newBreaker(id)
		b.m[id] = nb
	}
	return nb
}

// failed is told of each failure a breaker counts: on a Cluster it asks
// for a slot-map reload, at most every 100ms (go-redis's reload runs in
// the background and coalesces requests).
func (b *breakers) failed() {
	if b.reload == nil {
		return
	}
	now := time.Now().UnixNano()
	last := b.lastReload.Load()
	if now-last < int64(100*time.Millisecond) || !b.lastReload.CompareAndSwap(last, now) {
		return
	}
	b.reload()
}

// state returns the worst state of the breakers: "open" if any is open,
// else "half-open" if any is, else "closed".
func (b *breakers) state() string {
	b.mu.Lock()
	all := make([]*breaker, 0, len(b.m))
	for _, nb := range b.m {
		all = append(all, nb)
	}
	b.mu.Unlock()
	worst := gobreaker.StateClosed
	for _, nb := range all {
		worst = worse(worst, nb.State()) // State moves an open breaker past its cooldown to half-open
	}
	return worst.String()
}

// worse returns the worse of two breaker states: open, then half-open,
// then closed.
func worse(a, b gobreaker.State) gobreaker.State {
	rank := func(s gobreaker.State) int {
		switch s {
		case gobreaker.StateOpen:
			return 2
		case gobreaker.StateHalfOpen:
			return 1
		}
		return 0
	}
	if rank(b) > rank(a) {
		return b
	}
	return a
}

// nodeDownLocked reports whether a breaker of node is not closed; b.mu is
// held.
func (b *breakers) nodeDownLocked(node string) bool {
	for id := range b.states {
		if id.node == node {
			return true
		}
	}
	return false
}

// summaryLocked computes the worst state from the states the breakers
// reported; b.mu is held.
func (b *breakers) summaryLocked() string {
	worst := gobreaker.StateClosed
	for _, st := range b.states {
		worst = worse(worst, st)
	}
	return worst.String()
}

// newBreaker builds the breaker of id, reporting its state changes to the
// event sink, and to the logger the ones a person needs: a node down (the
// first of its breakers opens) and recovered (the last of them closes;
// with the summary of what was suppressed meanwhile once every breaker is
// closed). The rest (the other direction of a node already down, the
// probes of an outage) log at debug level only.
func (b *breakers) newBreaker(id breakerID) *gobreaker.TwoStepCircuitBreaker[struct{}] {
	st := b.st
	attrs := func() []slog.Attr {
		a := []slog.Attr{slog.String("cache", st.name), slog.String("direction", id.dir.String())}
		if id.node != "" {
			a = append(a, slog.String("node", id.node))
		}
		return a
	}
	return gobreaker.NewTwoStepCircuitBreaker[struct{}](gobreaker.Settings{
		Name:        st.name,
		MaxRequests: 1, // half-open: one probe at a time
		Timeout:     st.cooldown,
		ReadyToTrip: func(c gobreaker.Counts) bool { return c.ConsecutiveFailures >= uint32(st.failures) },
		IsExcluded:  func(err error) bool { return errors.Is(err, errExcluded) },
		OnStateChange: func(_ string, from, to gobreaker.State) {
			ctx := context.Background()
			b.mu.Lock()
			wasDown := b.nodeDownLocked(id.node)
			if to == gobreaker.StateClosed {
				delete(b.states, id)
			} else {
				b.states[id] = to
			}
			down := b.nodeDownLocked(id.node)
			if !wasDown && down {
				b.downSince[id.node] = time.Now()
			}
			since := b.downSince[id.node]
			summary := b.summaryLocked()
			changed := summary != b.summary
			b.summary = summary
			b.mu.Unlock()

			switch {
			case !wasDown && down:
				st.log.LogAttrs(ctx, slog.LevelWarn, "cacheaside: Redis down: circuit breaker open; "+id.dir.String()+" bypass Redis",
					append(attrs(), slog.Duration("probe_every", st.cooldown))...)
			case wasDown && !down:
				st.log.LogAttrs(ctx, slog.LevelInfo, "cacheaside: Redis recovered: circuit breaker closed",
					append(attrs(), slog.Duration("down_for", time.Since(since).Round(time.Millisecond)))...)
				if summary == gobreaker.StateClosed.String() {
					counts, since := st.logs.flush(time.Now())
					logSummary(ctx, st.log, st.name, "errors suppressed without a log line during the outage", counts, since)
				}
			default:
				st.log.LogAttrs(ctx, slog.LevelDebug, "cacheaside: Redis circuit breaker "+to.String(),
					append(attrs(), slog.String("from", from.String()))...)
			}
			st.ev.breakerState(summary, to == gobreaker.StateOpen, changed)
		},
	})
}
