-- tag: the current generation of a tag (or of a cache's Clear), created if
-- it has none. A load reads it before it reads the source, so an entry
-- stamped with it dies once the tag is invalidated.
-- KEYS[1]  the tag's generation key
-- ARGV[1]  8 random bytes: the generation to create if the tag has none
-- ARGV[2]  lifetime of the generation key in milliseconds
-- Returns the tag's generation.
local gen = redis.pcall('GET', KEYS[1])
if type(gen) ~= 'string' or #gen ~= 8 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ARGV[1]
end
return gen
