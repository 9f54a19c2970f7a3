REDIS ?= 127.0.0.1:6379
DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/test?sslmode=disable

.PHONY: test race bench bench-local bench-many bench-invalidate bench-degrade lint fuzz ci

# What a fresh machine with only Go runs: every module's tests on miniredis
# and SQLite, the README's test command.
test:
	go run ./internal/testall

# The same suite with the race detector, also against the real Redis at $(REDIS)
# and a 3-master Redis Cluster the tests start themselves (redis-server, redis-cli).
race:
	CACHEASIDE_REDIS_ADDR=$(REDIS) CACHEASIDE_REDIS_FAULTS=1 CACHEASIDE_REDIS_CLUSTER=1 go test -race -count=1 ./...
	DATABASE_URL=$(DATABASE_URL) REDIS_URL=redis://$(REDIS)/0 go -C examples test -race -count=1 ./...

# Hit path (fresh and stale-served) beside the raw go-redis GET +
# json.Unmarshal baseline, on a real Redis. The two run interleaved, 8 rounds, so drift on the machine hits both
# alike; benchstat reports medians with their spread.
bench:
	go test -c -o /tmp/cacheaside.test .
	rm -f /tmp/cacheaside-bench.txt
	for i in 1 2 3 4 5 6 7 8; do \
	  CACHEASIDE_REDIS_ADDR=$(REDIS) /tmp/cacheaside.test -test.run '^$$' -test.bench 'RawGet|GetHit|GetStale' \
	    -test.benchmem -test.benchtime 1s | grep Benchmark >> /tmp/cacheaside-bench.txt; \
	done
	go run golang.org/x/perf/cmd/benchstat@v0.0.0-20260908200009-22c9c6c9d4da /tmp/cacheaside-bench.txt
	CACHEASIDE_REDIS_ADDR=$(REDIS) /tmp/cacheaside.test -test.run '^$$' -test.bench 'HitVsRaw' -test.benchtime 3s -test.count 5

# Local-tier hits (serial, parallel), the Redis tier at 64 goroutines beside
# raw go-redis, and go-redis client-side caching for comparison.
bench-local:
	CACHEASIDE_REDIS_ADDR=$(REDIS) go test -run '^$$' -bench 'LocalHit|RedisTier64|ClientSideCachingHit' -benchmem -count 3 .

# GetMany of 100 warm keys beside a raw MGET and beside 100 single Gets.
bench-many:
	CACHEASIDE_REDIS_ADDR=$(REDIS) go test -run '^$$' -bench 'GetMany100' -benchtime 2s -count 3 .

# Prefix invalidation of 10,000 keys among 1,000,000, beside a namespace bump.
bench-invalidate:
	CACHEASIDE_REDIS_ADDR=$(REDIS) go test -run '^$$' -bench 'Invalidate(Prefix|Namespace)' -benchtime 10x -count 3 .

# Get with Redis down (breaker open) and black-holed, beside the bare loader.
bench-degrade:
	CACHEASIDE_REDIS_FAULTS=1 go test -run '^$$' -bench 'BareLoader|BreakerOpen|BlackHoled' -benchtime 2s -count 3 .

lint:
	test -z "$$(gofmt -l .)"
	go vet ./...
	go run honnef.co/go/tools/cmd/staticcheck@v0.8.2 ./...

fuzz:
	go test -run '^$$' -fuzz '^FuzzDecode$$' -fuzztime 60s ./internal/envelope
	go test -run '^$$' -fuzz '^FuzzKeyspaceKey$$' -fuzztime 60s .

ci:
	.ci/run
