export * as Database from "./Database.js"
export * as EventStore from "./EventStore.js"
export * as EventWriter from "./EventWriter.js"
export * as Migrations from "./Migrations.js"
