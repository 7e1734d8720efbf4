"""DeepPlanning's nine travel tools (paper §7, Table 7: the agentic setting), bound to one task's CSV database:
the benchmark's names and parameters, answering as its tools (Qwen-Agent's travelplanning/tools) do on the same
files: the same fields and shapes, the same numbers made ints or floats, the same order and the same sentences when
nothing matches. One difference: where no flight matches, the official flight tool fails (its message wants an
argument it is not given) and its agent shows the error; here the model reads the sentence it meant.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Callable

TABLES = {"trains": "trains/trains.csv", "flights": "flights/flights.csv", "hotels": "hotels/hotels.csv",
          "attractions": "attractions/attractions.csv", "restaurants": "restaurants/restaurants.csv",
          "locations": "locations/locations_coords.csv", "routes": "transportation/distance_matrix.csv"}

# The cells pandas.read_csv reads as missing (its default na_values): the official tools read every table with
# pandas (dtype=str), so such a cell reaches them as NaN, which they show as "nan", "" or a JSON NaN.
MISSING = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                     "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})


class TravelDatabase:
    """One task's CSV tables (id_<n>/), each read on first use: rows (every value a string, as written; what the
    checks read) and frame (as the official tools see them)."""
    def __init__(self, folder: Path):
        self.folder, self.tables, self.frames = Path(folder), {}, {}

    def rows(self, table: str) -> list[dict]:
        if table not in self.tables:
            with open(self.folder / TABLES[table], encoding="utf-8-sig", newline="") as f:
                self.tables[table] = [{k: (v or "").strip() for k, v in row.items()} for row in csv.DictReader(f)]
        return self.tables[table]

    def frame(self, table: str) -> list[dict]:
        """A table's rows as the official tools hold them: strings, with NaN for a missing cell (MISSING)."""
        if table not in self.frames:
            self.frames[table] = [{k: math.nan if v in MISSING else v for k, v in row.items()}
                                  for row in self.rows(table)]
        return self.frames[table]


def _json(value) -> str:
    """A result as the official tools write it."""
    return json.dumps(value, ensure_ascii=False, indent=2)


def _items(cell) -> list[str] | None:
    """A ";"-separated cell (hotel services, restaurant tags) split as the official tools split it; None when
    blank."""
    return cell.split(";") if isinstance(cell, str) and cell.strip() else None


def _cleaned(cell) -> str:
    """A hotel cell as the official hotel tool shows it: missing is ""."""
    return "" if isinstance(cell, float) and math.isnan(cell) else str(cell)


def _number(cell) -> float | None:
    """An attraction's number as the official tool reads it: a float, None when missing or not a number."""
    try:
        number = float(cell)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def _fare(cell) -> float | int:
    """A route's price: its first segment's, a float (NaN when missing, as pandas gives it), 0 when unreadable."""
    try:
        return float(cell)
    except (TypeError, ValueError):
        return 0


def _seats(cell) -> str:
    return "Available" if str(cell).strip().lower() in ("", "nan") else cell  # a blank status means seats are left


def _train_segment(row: dict, before: dict | None) -> dict:
    # a transfer's later segment names its departure city after the previous arrival station, as officially
    city = row["origin_city"] if before is None else before["arr_station_name"].split(" Station")[0]
    return {"arrCityName": row["destination_city"], "arrStationCode": row["arr_station_code"],
            "arrStationName": row["arr_station_name"], "depCityName": city,
            "depStationCode": row["dep_station_code"], "depStationName": row["dep_station_name"],
            "duration": int(row["duration"]), "arrDateTime": row["arr_datetime"], "depDateTime": row["dep_datetime"],
            "marketingTransportName": row["train_type"], "marketingTransportNo": row["train_no"],
            "seatClassName": row["seat_class"], "Remaining Seats": _seats(row["seat_status"])}


def _flight_segment(row: dict, before: dict | None) -> dict:
    return {"arrCityName": row["destination_city"], "arrStationCode": row["arr_station_code"],
            "arrStationName": row["arr_station_name"], "depCityName": row["origin_city"],
            "depStationCode": row["dep_station_code"], "depStationName": row["dep_station_name"],
            "duration": int(row["duration"]), "arrDateTime": row["arr_datetime"], "depDateTime": row["dep_datetime"],
            "marketingTransportName": row["airline"], "marketingTransportNo": row["flight_no"],
            "seatClassName": row["seat_class"], "Remaining Seats": _seats(row["seat_status"]),
            "equipSize": row["equip_size"], "equipType": row["equip_type"], "manufacturer": row["manufacturer"]}


def _timetable(db: TravelDatabase, table: str, origin: str, destination: str, date: str, seat_class: str) -> list:
    """The day's routes (route_index) between two cities, each {"Segment 1": ..., "Segment 2": ..., "price"}: its
    segments (of the asked seat class) in segment_index order and its first segment's price. The indexes are
    text, ordered as text ("10" before "2"), as the official tools order them."""
    rows = [r for r in db.frame(table) if (r["origin_city"], r["destination_city"], r["dep_date"])
            == (origin, destination, date) and (not seat_class or r["seat_class"] == seat_class)]
    segment = _train_segment if table == "trains" else _flight_segment
    routes = []
    for index in sorted({r["route_index"] for r in rows}):
        legs = sorted((r for r in rows if r["route_index"] == index), key=lambda r: r["segment_index"])
        route = {f"Segment {n}": segment(leg, legs[n - 2] if n > 1 else None) for n, leg in enumerate(legs, 1)}
        routes.append(route | {"price": _fare(legs[0]["price"])})
    return routes


def _hotel(row: dict) -> dict:
    shown = {key: _cleaned(row.get(column, "")) for key, column in (
        ("name", "name"), ("address", "address"), ("latitude", "latitude"), ("longitude", "longitude"),
        ("decorationTime", "decoration_time"), ("hotelStar", "hotel_star"), ("price", "price"), ("score", "score"),
        ("brand", "brand"))}
    return shown | ({"services": services} if (services := _items(row.get("services"))) else {})


def _attraction_card(row: dict) -> str:
    """An attraction as the official details tool writes it: labelled lines, numbers as floats."""
    text = {key: str(row.get(key, "")) for key in ("attraction_id", "attraction_name", "city", "address", "latitude",
                                                    "longitude", "description", "opening_time", "closing_time",
                                                    "closing_dates", "attraction_type")}
    rating, shortest, longest, ticket = (_number(row.get(key)) for key in (
        "rating", "min_visit_hours", "max_visit_hours", "ticket_price"))
    opening, closing = text["opening_time"], text["closing_time"]
    lines = [("Attraction ID", text["attraction_id"]), ("Attraction Name", text["attraction_name"]),
             ("City", text["city"]), ("Address", text["address"]),
             ("Coordinates", f"Latitude {text['latitude']}，Longitude {text['longitude']}"),
             ("Description", text["description"]),
             ("Rating", f"{'' if rating is None else rating}(average visitor rating)"),
             ("Opening Hours", opening if opening == closing else f"{opening} to {closing}"),
             ("Closed Dates", text["closing_dates"]),
             ("Minimum Visit Duration", f"{'' if shortest is None else shortest} hours"),
             ("Maximum Visit Duration", f"{'' if longest is None else longest} hours"),
             ("Ticket Price", f"{'0' if ticket is None else ticket} RMB"),
             ("Attraction Type", text["attraction_type"])]
    return "\n".join(f"{label}：{value}" for label, value in lines)  # full-width colons, as officially


def _restaurant(row: dict, rating: str, price: str) -> dict:
    """A restaurant as both official restaurant tools show it (they differ only in the defaults for an absent
    column): names and times as read, coordinates, price and rating as text, tags as a list when there are any."""
    shown = {"name": row.get("restaurant_name", ""), "latitude": str(row.get("latitude", 0)),
             "longitude": str(row.get("longitude", 0)), "price_per_person": str(row.get("price_per_person", price)),
             "cuisine": row.get("cuisine", ""), "opening_time": row.get("opening_time", ""),
             "closing_time": row.get("closing_time", ""),
             "nearby_attraction_name": row.get("nearby_attraction_name", ""), "rating": str(row.get("rating", rating))}
    return shown | ({"tags": tags} if (tags := _items(row.get("tags"))) else {})


def travel_tools(db: TravelDatabase) -> list[Callable]:
    """The benchmark's nine tools, bound to one task's database, each answering as the official tool does: the
    same fields, shapes and texts, and its sentence when nothing matches (a malformed argument, such as a date
    in another format, matches nothing). A missing argument raises, and the model reads the error."""

    def query_train_info(origin: str, destination: str, depDate: str, seatClassName: str = "") -> str:
        """Train tickets between two cities on one day, direct and with transfers: a list of routes, each a
        one-item list holding {"Segment 1": ..., "Segment 2": ..., "price"}; a segment has its cities, station
        names and codes, times, duration in minutes, train type and number, seat class and remaining seats, and a
        route's price per person is its first segment's. Use station names and train numbers exactly as returned.

        Args:
            origin: Departure city name.
            destination: Arrival city name.
            depDate: Departure date, YYYY-MM-DD.
            seatClassName: Optional seat class: First Class Seat, Second Class Seat or Business Seat.
        """
        routes = _timetable(db, "trains", origin, destination, depDate, seatClassName)
        if not routes:
            return f"No train information found from {origin} to {destination} on {depDate}"
        return _json([[route] for route in routes])

    def query_flight_info(origin: str, destination: str, depDate: str, seatClassName: str = "") -> str:
        """Flights between two cities on one day, direct and connecting: a list of routes, each {"Segment 1": ...,
        "Segment 2": ..., "price"}; a segment has its cities, airport names and codes, times, duration in minutes,
        airline and flight number, seat class, remaining seats and aircraft, and a route's price per person is its
        first segment's. Use airport names and flight numbers exactly as returned.

        Args:
            origin: Departure city name.
            destination: Arrival city name.
            depDate: Departure date, YYYY-MM-DD.
            seatClassName: Optional seat class: Economy Class, Business Class or First Class.
        """
        routes = _timetable(db, "flights", origin, destination, depDate, seatClassName)
        if not routes:
            return f"No flight information found from {origin} to {destination} on {depDate}"
        return _json(routes)

    def query_hotel_info(destination: str, checkinDate: str, checkoutDate: str, hotelStar: str = "",
                         hotelBrands: str = "") -> str:
        """Hotels at the destination: name, address, coordinates, renovation year (decorationTime), stars, price
        per room and night, score, brand and services. Use hotel names exactly as returned.

        Args:
            destination: Destination (city, district or county name).
            checkinDate: Check-in date, YYYY-MM-DD.
            checkoutDate: Check-out date, YYYY-MM-DD.
            hotelStar: Optional star rating, a single value from 1 to 5.
            hotelBrands: Optional single brand, e.g. Ji Hotel, Atour Hotel, Marriott, Hilton, Home Inn, Orange Hotel.
        """
        # as officially, neither the destination nor the dates filter: a task's database holds its own hotels
        found = [_hotel(r) for r in db.frame("hotels") if (not hotelStar or r.get("hotel_star") == hotelStar)
                 and (not hotelBrands or r.get("brand") == hotelBrands)]
        return _json(found) if found else (f"No hotel information found in {destination} from {checkinDate} to "
                                           f"{checkoutDate}, please check parameters or reduce constraints")

    def query_attraction_details(attraction_name: str) -> str:
        """One attraction, as labelled lines: ID, name, city, address, coordinates, description, rating, opening
        hours, closed dates, minimum and maximum visit duration in hours, ticket price, type.

        Args:
            attraction_name: The attraction's exact name.
        """
        row = next((r for r in db.frame("attractions") if r.get("attraction_name") == attraction_name), None)
        return _attraction_card(row) if row else f"Detailed information not found for attraction {attraction_name}"

    def recommend_attractions(city: str, attraction_type: str = "") -> str:
        """A city's popular attractions, optionally of one type, one line each: name, description, type. Only
        attractions returned here may appear in the plan, under exactly these names.

        Args:
            city: City name.
            attraction_type: Optional type: Historical and Cultural, Natural Scenery, Art Exhibition,
                City Landmark, Theme Park or Leisure Experience.
        """
        # as officially, the city filters nothing: a task's database holds its destination's attractions
        found = [r for r in db.frame("attractions")
                 if not attraction_type or r.get("attraction_type") == attraction_type]
        if not found:
            return "No attraction recommendations found"
        lines = [f"{r.get('attraction_name', '')}, {r.get('description', '')}. This is a "
                 f"{r.get('attraction_type', '')} type attraction" for r in found]
        return "\n".join(["Recommended attractions:\n", *lines])

    def search_location(place_name: str) -> str:
        """Latitude and longitude (six decimals) of a place that another tool named.

        Args:
            place_name: The place's exact name: a hotel, attraction, restaurant, station or airport.
        """
        row = next((r for r in db.frame("locations") if r.get("poi_name", r.get("place_name")) == place_name), None)
        if row is None:
            return (f"Coordinate information not found for location {place_name}, please check: 1. Whether the "
                    f"place name comes from other tool results; 2. Whether the place name is exactly consistent "
                    f"with tool results, no abbreviation, renaming or additional description allowed")
        return _json({"place_name": row.get("poi_name", row.get("place_name", place_name)),
                      "latitude": str(row.get("latitude", "")), "longitude": str(row.get("longitude", ""))})

    def query_road_route_info(origin: str, destination: str) -> str:
        """Road route between two points: distance in meters, duration in minutes, cost, all whole numbers. Up to
        2 km it is a walk (cost 0), beyond that a taxi, whose cost is per car of up to 4 people.

        Args:
            origin: Start point, "latitude,longitude" with six decimals as search_location returns them.
            destination: End point, "latitude,longitude" with six decimals as search_location returns them.
        """
        rows = db.frame("routes")
        known = {r["origin"] for r in rows} | {r["destination"] for r in rows}
        if stray := next((point for point in (origin, destination) if point not in known), None):
            return (f"Coordinate {stray} is not in query range, please check:\n1. Whether coordinate comes from "
                    f"valid tool query result, not manual input or fabrication;\n2. Whether coordinate precision is "
                    f"exactly consistent with query result, 6 decimal places")
        row = next((r for r in rows if (r["origin"], r["destination"]) == (origin, destination)), None)
        if row is None:
            return f"No transportation information found from {origin} to {destination}"
        return _json({"origin": row["origin"], "destination": row["destination"],
                      "distance_in_meters": int(row.get("distance_meters", 0)),
                      "duration_in_minutes": int(row.get("duration_minutes", 0)), "cost": int(row.get("cost", 0))})

    def recommend_restaurants(latitude: str, longitude: str) -> str:
        """Restaurants near a point: name, coordinates, price per person, cuisine, opening and closing time,
        nearby attraction, rating, tags.

        Args:
            latitude: Latitude with six decimals, as another tool returned it.
            longitude: Longitude with six decimals, as another tool returned it.
        """
        found = [_restaurant(r, rating="4.5", price="0") for r in db.frame("restaurants")
                 if (r.get("query_latitude"), r.get("query_longitude")) == (latitude, longitude)]
        return _json(found) if found else (f"No recommended restaurants found near coordinates ({latitude}, "
                                           f"{longitude}), please check coordinate source")

    def query_restaurant_details(restaurant_name: str) -> str:
        """One restaurant: ID, name, coordinates, price per person, cuisine, opening and closing time, nearby
        attraction, rating, tags.

        Args:
            restaurant_name: The restaurant's exact name.
        """
        row = next((r for r in db.frame("restaurants") if r.get("restaurant_name") == restaurant_name), None)
        if row is None:
            return _json({"message": f"Detailed information not found for restaurant {restaurant_name}",
                          "restaurant_name": restaurant_name})
        return _json({"id": row.get("restaurant_id", "")} | _restaurant(row, rating="4.0", price="100"))

    return [query_train_info, query_flight_info, query_hotel_info, query_attraction_details, recommend_attractions,
            search_location, query_road_route_info, recommend_restaurants, query_restaurant_details]
