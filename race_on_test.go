//go:build race

package cacheaside

// raceEnabled: the race detector slows every goroutine several times, so
// tests that check a latency bound allow for it.
const raceEnabled = true
