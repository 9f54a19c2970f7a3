// Outage logging: state changes and periodic summaries, not a line per
// failed command.

package cacheaside

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"
)

// An outage fails every command, and a busy service sends thousands a
// second. What reaches Options.Logger is bounded instead:
//
//   - state changes: the breaker opening ("Redis down") and closing
//     ("Redis recovered"), the invalidation bus lost and back;
//   - the first suppressed error of each kind (the op: "get", "acquire",
//     "fill", ...) in each summary interval, at Warn, with its key and error;
//   - one summary line per interval in which more were suppressed, with
//     the count per op, and one when Redis recovers.
//
// OnError, the Recorder and Stats still see every error.

// summaryInterval is the longest a suppressed error goes unlogged.
const summaryInterval = 10 * time.Second

// logGate decides which suppressed errors are logged.
type logGate struct {
	mu      sync.Mutex
	start   time.Time      // of the current interval
	logged  map[string]int // op → errors logged in it (at most 1)
	counted map[string]int // op → errors suppressed without a line
}

// admit reports whether an error of op is logged now. When the interval
// has run out, it first returns the counts of the one before, for the
// summary line.
func (g *logGate) admit(op string, now time.Time) (log bool, summary map[string]int, since time.Time) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.start.IsZero() || now.Sub(g.start) >= summaryInterval {
		summary, since = g.counted, g.start
		g.start, g.logged, g.counted = now, map[string]int{}, nil
	}
	if g.logged[op] == 0 {
		g.logged[op] = 1
		return true, summary, since
	}
	if g.counted == nil {
		g.counted = map[string]int{}
	}
	g.counted[op]++
	return false, summary, since
}

// flush returns what was suppressed without a line so far, and starts a
// new interval.
func (g *logGate) flush(now time.Time) (map[string]int, time.Time) {
	g.mu.Lock()
	defer g.mu.Unlock()
	c, s := g.counted, g.start
	g.start, g.logged, g.counted = now, map[string]int{}, nil
	return c, s
}

// logSummary logs the count of suppressed errors per op, if any.
func logSummary(ctx context.Context, log *slog.Logger, name, what string, counts map[string]int, since time.Time) {
	if len(counts) == 0 {
		return
	}
	total := 0
	var parts []string
	for _, op := range slices.Sorted(maps.Keys(counts)) {
		total += counts[op]
		parts = append(parts, fmt.Sprintf("%s %d", op, counts[op]))
	}
	log.LogAttrs(ctx, slog.LevelWarn, "cacheaside: "+what,
		slog.String("cache", name), slog.Int("suppressed", total), slog.String("by_op", strings.Join(parts, ", ")),
		slog.Duration("over", time.Since(since).Round(time.Millisecond)))
}
