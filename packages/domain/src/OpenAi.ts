/**
 * The OpenAI chat-completions wire format: request, response, stream chunk, usage and error body.
 * Request schemas validate what the gateway relies on and let unknown fields through untouched,
 * so new OpenAI or vLLM parameters reach the backend without a gateway release.
 */
import { Schema } from "effect"

const opt = <S extends Schema.Schema.Any>(schema: S) => Schema.optional(Schema.NullOr(schema))

const Probability = Schema.Number.pipe(Schema.between(0, 1))
const PositiveInt = Schema.Int.pipe(Schema.greaterThanOrEqualTo(1))
const NonNegativeInt = Schema.Int.pipe(Schema.greaterThanOrEqualTo(0))

// ---------------------------------------------------------------------------------------------
// Content parts
// ---------------------------------------------------------------------------------------------

export const TextPart = Schema.Struct({ type: Schema.Literal("text"), text: Schema.String }).annotations({
  identifier: "TextPart"
})
export const ImageUrlPart = Schema.Struct({
  type: Schema.Literal("image_url"),
  image_url: Schema.Struct({ url: Schema.String, detail: Schema.optional(Schema.String) })
}).annotations({ identifier: "ImageUrlPart" })
export const InputAudioPart = Schema.Struct({
  type: Schema.Literal("input_audio"),
  input_audio: Schema.Struct({ data: Schema.String, format: Schema.String })
}).annotations({ identifier: "InputAudioPart" })
export const FilePart = Schema.Struct({ type: Schema.Literal("file"), file: Schema.Object }).annotations({
  identifier: "FilePart"
})
export const RefusalPart = Schema.Struct({
  type: Schema.Literal("refusal"),
  refusal: Schema.String
}).annotations({
  identifier: "RefusalPart"
})

const knownPartTypes = new Set(["text", "image_url", "input_audio", "file", "refusal"])
/** A part type the gateway does not know (e.g. vLLM's `video_url`): passed through as is. */
export const OtherPart = Schema.Struct({
  type: Schema.String.pipe(Schema.filter((t) => !knownPartTypes.has(t) || `unknown content part type`))
}).annotations({ identifier: "OtherPart" })

export const ContentPart = Schema.Union(
  TextPart,
  ImageUrlPart,
  InputAudioPart,
  FilePart,
  RefusalPart,
  OtherPart
).annotations({ identifier: "ContentPart" })
export type ContentPart = typeof ContentPart.Type

const TextContent = Schema.Union(Schema.String, Schema.Array(TextPart))

// ---------------------------------------------------------------------------------------------
// Tools
// ---------------------------------------------------------------------------------------------

export const ToolCall = Schema.Struct({
  id: Schema.String,
  type: Schema.Literal("function"),
  function: Schema.Struct({ name: Schema.String, arguments: Schema.String })
}).annotations({ identifier: "ToolCall" })
export type ToolCall = typeof ToolCall.Type

export const FunctionDefinition = Schema.Struct({
  name: Schema.String.pipe(Schema.pattern(/^[A-Za-z0-9_-]{1,64}$/)),
  description: Schema.optional(Schema.String),
  parameters: Schema.optional(Schema.Object),
  strict: opt(Schema.Boolean)
}).annotations({ identifier: "FunctionDefinition" })

export const Tool = Schema.Struct({
  type: Schema.Literal("function"),
  function: FunctionDefinition
}).annotations({ identifier: "Tool" })
export type Tool = typeof Tool.Type

export const ToolChoice = Schema.Union(
  Schema.Literal("none", "auto", "required"),
  Schema.Struct({ type: Schema.Literal("function"), function: Schema.Struct({ name: Schema.String }) })
).annotations({ identifier: "ToolChoice" })

// ---------------------------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------------------------

export const SystemMessage = Schema.Struct({
  role: Schema.Literal("system"),
  content: TextContent,
  name: Schema.optional(Schema.String)
}).annotations({ identifier: "SystemMessage" })

/** The newer name OpenAI gives system instructions for reasoning models. */
export const DeveloperMessage = Schema.Struct({
  role: Schema.Literal("developer"),
  content: TextContent,
  name: Schema.optional(Schema.String)
}).annotations({ identifier: "DeveloperMessage" })

export const UserMessage = Schema.Struct({
  role: Schema.Literal("user"),
  content: Schema.Union(Schema.String, Schema.Array(ContentPart)),
  name: Schema.optional(Schema.String)
}).annotations({ identifier: "UserMessage" })

export const AssistantMessage = Schema.Struct({
  role: Schema.Literal("assistant"),
  content: opt(Schema.Union(Schema.String, Schema.Array(Schema.Union(TextPart, RefusalPart)))),
  name: Schema.optional(Schema.String),
  refusal: opt(Schema.String),
  tool_calls: opt(Schema.Array(ToolCall)),
  function_call: opt(Schema.Struct({ name: Schema.String, arguments: Schema.String }))
}).annotations({ identifier: "AssistantMessage" })

export const ToolMessage = Schema.Struct({
  role: Schema.Literal("tool"),
  content: TextContent,
  tool_call_id: Schema.String
}).annotations({ identifier: "ToolMessage" })

export const FunctionMessage = Schema.Struct({
  role: Schema.Literal("function"),
  name: Schema.String,
  content: Schema.NullOr(Schema.String)
}).annotations({ identifier: "FunctionMessage" })

export const Message = Schema.Union(
  SystemMessage,
  DeveloperMessage,
  UserMessage,
  AssistantMessage,
  ToolMessage,
  FunctionMessage
)
export type Message = typeof Message.Type

// ---------------------------------------------------------------------------------------------
// Request
// ---------------------------------------------------------------------------------------------

export const ResponseFormat = Schema.Union(
  Schema.Struct({ type: Schema.Literal("text") }),
  Schema.Struct({ type: Schema.Literal("json_object") }),
  Schema.Struct({
    type: Schema.Literal("json_schema"),
    json_schema: Schema.Struct({
      name: Schema.String,
      description: Schema.optional(Schema.String),
      schema: Schema.optional(Schema.Object),
      strict: opt(Schema.Boolean)
    })
  })
).annotations({ identifier: "ResponseFormat" })

export const StreamOptions = Schema.Struct({ include_usage: Schema.optional(Schema.Boolean) }).annotations({
  identifier: "StreamOptions"
})

/** `POST /v1/chat/completions` body. Unknown fields are kept (see `decodeChatCompletionRequest`). */
export const ChatCompletionRequest = Schema.Struct({
  model: Schema.String.pipe(Schema.minLength(1, { message: () => "model must be a non-empty string" })),
  messages: Schema.Array(Message).pipe(
    Schema.minItems(1, { message: () => "messages must contain at least one message" })
  ),
  stream: opt(Schema.Boolean),
  stream_options: opt(StreamOptions),
  temperature: opt(Schema.Number.pipe(Schema.between(0, 2))),
  top_p: opt(Probability),
  n: opt(PositiveInt),
  max_tokens: opt(PositiveInt),
  max_completion_tokens: opt(PositiveInt),
  stop: opt(Schema.Union(Schema.String, Schema.Array(Schema.String).pipe(Schema.maxItems(4)))),
  presence_penalty: opt(Schema.Number.pipe(Schema.between(-2, 2))),
  frequency_penalty: opt(Schema.Number.pipe(Schema.between(-2, 2))),
  logit_bias: opt(Schema.Record({ key: Schema.String, value: Schema.Number })),
  logprobs: opt(Schema.Boolean),
  top_logprobs: opt(NonNegativeInt.pipe(Schema.lessThanOrEqualTo(20))),
  seed: opt(Schema.Int),
  user: opt(Schema.String),
  tools: opt(Schema.Array(Tool)),
  tool_choice: opt(ToolChoice),
  parallel_tool_calls: opt(Schema.Boolean),
  response_format: opt(ResponseFormat),
  metadata: opt(Schema.Record({ key: Schema.String, value: Schema.String }))
})
export type ChatCompletionRequest = typeof ChatCompletionRequest.Type

/** Validates a parsed body, keeping unknown fields and reporting the first problem only (cheap). */
export const decodeChatCompletionRequest = Schema.decodeUnknownEither(ChatCompletionRequest, {
  errors: "first",
  onExcessProperty: "preserve"
})

// ---------------------------------------------------------------------------------------------
// Response, chunk, usage
// ---------------------------------------------------------------------------------------------

export const Usage = Schema.Struct({
  prompt_tokens: NonNegativeInt,
  completion_tokens: NonNegativeInt,
  total_tokens: NonNegativeInt,
  prompt_tokens_details: opt(Schema.Struct({ cached_tokens: Schema.optional(NonNegativeInt) })),
  completion_tokens_details: opt(Schema.Struct({ reasoning_tokens: Schema.optional(NonNegativeInt) }))
}).annotations({ identifier: "Usage" })
export type Usage = typeof Usage.Type

export const FinishReason = Schema.Literal("stop", "length", "tool_calls", "content_filter", "function_call")
export type FinishReason = typeof FinishReason.Type

export const ChatCompletion = Schema.Struct({
  id: Schema.String,
  object: Schema.Literal("chat.completion"),
  created: Schema.Number,
  model: Schema.String,
  system_fingerprint: opt(Schema.String),
  choices: Schema.Array(
    Schema.Struct({
      index: NonNegativeInt,
      message: Schema.Struct({
        role: Schema.Literal("assistant"),
        content: Schema.NullOr(Schema.String),
        refusal: opt(Schema.String),
        tool_calls: opt(Schema.Array(ToolCall))
      }),
      finish_reason: Schema.NullOr(FinishReason),
      logprobs: opt(Schema.Unknown)
    })
  ),
  usage: opt(Usage)
})
export type ChatCompletion = typeof ChatCompletion.Type

export const ChatCompletionChunk = Schema.Struct({
  id: Schema.String,
  object: Schema.Literal("chat.completion.chunk"),
  created: Schema.Number,
  model: Schema.String,
  system_fingerprint: opt(Schema.String),
  choices: Schema.Array(
    Schema.Struct({
      index: NonNegativeInt,
      delta: Schema.Struct({
        role: opt(Schema.Literal("assistant")),
        content: opt(Schema.String),
        refusal: opt(Schema.String),
        tool_calls: opt(
          Schema.Array(
            Schema.Struct({
              index: NonNegativeInt,
              id: Schema.optional(Schema.String),
              type: Schema.optional(Schema.Literal("function")),
              function: Schema.optional(
                Schema.Struct({
                  name: Schema.optional(Schema.String),
                  arguments: Schema.optional(Schema.String)
                })
              )
            })
          )
        )
      }),
      finish_reason: Schema.NullOr(FinishReason),
      logprobs: opt(Schema.Unknown)
    })
  ),
  usage: opt(Usage)
})
export type ChatCompletionChunk = typeof ChatCompletionChunk.Type

// ---------------------------------------------------------------------------------------------
// Models and errors
// ---------------------------------------------------------------------------------------------

export const Model = Schema.Struct({
  id: Schema.String,
  object: Schema.Literal("model"),
  created: Schema.Number,
  owned_by: Schema.String
})

export const ModelList = Schema.Struct({ object: Schema.Literal("list"), data: Schema.Array(Model) })
export type ModelList = typeof ModelList.Type

/** The OpenAI error type names clients switch on. */
export const ErrorType = Schema.Literal(
  "invalid_request_error",
  "authentication_error",
  "permission_error",
  "not_found_error",
  "rate_limit_error",
  "insufficient_quota",
  "api_error",
  "server_error",
  "timeout_error"
)
export type ErrorType = typeof ErrorType.Type

/** `{ error: { message, type, param, code } }` as OpenAI sends it. */
export const ErrorBody = Schema.Struct({
  error: Schema.Struct({
    message: Schema.String,
    type: Schema.String,
    param: Schema.NullOr(Schema.String),
    code: Schema.NullOr(Schema.Union(Schema.String, Schema.Number))
  })
})
export type ErrorBody = typeof ErrorBody.Type
