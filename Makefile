REDIS ?= 127.0.0.1:6379

.PHONY: test race bench lint fuzz ci

# What a fresh machine with only Go runs: everything on miniredis.
test:
	go test ./...

# The same suite with the race detector, also against the real Redis at $(REDIS).
race:
	CACHEASIDE_REDIS_ADDR=$(REDIS) go test -race -count=1 ./...

# Hit path beside the raw go-redis GET + json.Unmarshal baseline, on a real Redis.
bench:
	CACHEASIDE_REDIS_ADDR=$(REDIS) go test -run '^$$' -bench 'RawGet|GetHit' -benchmem -count 10 .

lint:
	test -z "$$(gofmt -l .)"
	go vet ./...
	go run honnef.co/go/tools/cmd/staticcheck@v0.8.2 ./...

fuzz:
	go test -run '^$$' -fuzz '^FuzzDecode$$' -fuzztime 60s ./internal/envelope
	go test -run '^$$' -fuzz '^FuzzKeyspaceKey$$' -fuzztime 60s .

ci:
	.ci/run
